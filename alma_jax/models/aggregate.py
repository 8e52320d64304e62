"""k copies of a model whose logits are summed: the module of the agg-ensemble."""
from __future__ import annotations

import flax.linen as nn


class Aggregate(nn.Module):
  member: nn.Module
  num_members: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    """`mask`: the examples BatchNorm members count in training, as the member takes it.
    Passed by position: Flax's vmap drops keyword arguments."""
    stacked = nn.vmap(type(self.member), variable_axes={'params': 0, 'batch_stats': 0},
                      split_rngs={'params': True}, in_axes=None, axis_size=self.num_members)
    fields = {name: getattr(self.member, name) for name in self.member.__dataclass_fields__
              if name not in ('parent', 'name')}
    members = stacked(**fields, name='members')
    return (members(x, train) if mask is None else members(x, train, mask)).sum(0)
