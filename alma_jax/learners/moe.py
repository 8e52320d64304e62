"""gMoE: growth of a mixture-of-experts model (`model.name` moe_mlp or moe_vgg, models/moe.py).

A fixed MoE is any learner over a mixture model (e.g. finetune). gMoE is finetune that, after
every g rounds trained (g = `learner.grow_every`: before rounds g+1, 2g+1, ... counted from 1;
never before the first, as the reference: crlapi/sl/clmodels/finetune_grow.py:47-53), each mixture
layer's most used leaf expert (usage: the product of the nested gate probabilities on the path
to it, summed over the round's validation split) is split into a new mixture of two copies with
a fresh gate (`learner.growth='random'`: a random leaf instead). Growth is function-preserving.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from alma_jax import steps
from alma_jax.learners import base, members, single
from alma_jax.models import moe as moe_model


def leaf_usage(learner, variables, indices: np.ndarray) -> dict[str, float]:
  """{leaf path: usage summed over `indices` of the training set} for one member."""
  def usage_sums(v, images, labels, weights):
    del labels
    _, usage = learner.model.apply(v, learner.preprocess(images), with_usage=True)
    return {path: jnp.sum(weights * u) for path, u in usage.items()}

  evaluator = steps.Evaluator(usage_sums, learner.config.train.eval_batch_size,
                              learner.trainer.mesh, learner.config.data.prefetch)
  sums = evaluator(variables, learner.data.train_images, learner.data.train_labels, indices)
  return {path: float(v) for path, v in sums.items()}


def grow(learner, variables, indices: np.ndarray, key, by_usage: bool = True):
  """One member's `variables` with one leaf of every mixture layer split in two."""
  usage = leaf_usage(learner, variables, indices) if by_usage else {}
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())
  for i, (layer, paths) in enumerate(sorted(moe_model.leaf_paths(variables['params']).items())):
    chosen = (max(paths, key=usage.__getitem__) if by_usage else paths[rng.integers(len(paths))])
    variables = moe_model.split_leaf(variables, chosen, jax.random.fold_in(key, i))
  return variables


def gmoe(config) -> members.Plan:
  plan = single.finetune(config)

  by_usage = config.growth == 'usage'

  def grow_model(learner, state, round, key):
    grown = grow(learner, members.first_member(state.variables), round.valid, key, by_usage)
    # Measuring usage is one forward pass over the validation split.
    measured = base.counted(learner.flops(state.variables)['forward']) * len(round.valid)
    return grown, measured if by_usage else 0.0

  return dataclasses.replace(plan, work=single.growing(config.grow_every, grow_model))
