"""k copies of a model whose logits are summed: the module of the agg-ensemble."""
from __future__ import annotations

import flax.linen as nn


class Aggregate(nn.Module):
  member: nn.Module
  num_members: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False, **kwargs):
    stacked = nn.vmap(type(self.member), variable_axes={'params': 0, 'batch_stats': 0},
                      split_rngs={'params': True}, in_axes=None, axis_size=self.num_members)
    fields = {name: getattr(self.member, name) for name in self.member.__dataclass_fields__
              if name not in ('parent', 'name')}
    return stacked(**fields, name='members')(x, train, **kwargs).sum(0)
