"""Memory per device of a compiled ALMA epoch with and without sharded parameters (FSDP).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/benchmark_fsdp.py \
        [--config=configs/lm.py:gpt2_medium] [--out=experiments/results/fsdp_<backend>.json]

Builds the learner of the config over every device, lowers and compiles one member's epoch for
abstract inputs (nothing is allocated or trained), and writes XLA's memory analysis per device
(arguments: parameters, optimizer state and data; outputs; temporaries) with `mesh.shard_params`
off and on, and the ratios, in five settings: as configured (gpt2_medium: blocks scanned and
rematerialized, batch 16: 2 sequences a device); with 2 microbatches (of 8 sequences: one per
device, the smallest a run allows); with the blocks unscanned (`model.scan_blocks=False`: every
block's parameters gathered for the whole step); without remat; and with the same model on
sequences of 128 bytes, one a device, where the parameters and their optimizer state are most
of the memory. Then it trains that last setting, sharded, for `--train_steps` steps on the
devices present and writes its loss on 2 batches before and after.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import common
import jax
import jax.numpy as jnp
import numpy as np

from alma_jax import config as alma_config, data, learners, placement, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SETTINGS = (('as_configured', {}), ('two_microbatches', {'train.microbatches': 2}),
            ('unscanned', {'model.scan_blocks': False}), ('no_remat', {'model.remat': False}),
            ('short_sequences', {'data.sequence_length': 128, 'train.batch_size': 8}))


def epoch_memory(config) -> dict:
  dataset = data.load(config.data)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.member)
  microbatch = config.train.batch_size // config.train.microbatches
  if microbatch % mesh.shape[sharding.DATA]:
    raise ValueError(f'a microbatch of {microbatch} does not split over the '
                     f'{mesh.shape[sharding.DATA]} devices of the data axis (a run refuses it)')
  learner = learners.create(config, dataset, placement.device_data(dataset, mesh), mesh)
  trainer = learner.trainer
  variables = jax.eval_shape(lambda k: learner._init_members(k, 1), jax.random.key(0))
  opt_state = jax.eval_shape(learner.init_optimizer, variables)
  placed = sharding.stacked(mesh, (variables, opt_state), config.mesh.shard_params)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          (variables, opt_state), placed)
  n = 4 * config.train.batch_size
  indices = jax.ShapeDtypeStruct((1, n), jnp.int32)
  weights = jax.ShapeDtypeStruct((1, n), jnp.float32)
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(1), 1))
  with sharding.activations(mesh):  # as `Trainer.train_epoch` traces it
    compiled = trainer._epochs[False].lower(*abstract, learner.data.train_images,
                                            learner.data.train_labels, indices, weights, n, keys,
                                            0, None).compile()
  memory = compiled.memory_analysis()
  params = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(variables['params']))
  return {'parameter_bytes': params, 'argument_bytes': memory.argument_size_in_bytes,
          'output_bytes': memory.output_size_in_bytes, 'temp_bytes': memory.temp_size_in_bytes,
          'devices': jax.device_count()}


def train(config, steps: int) -> dict:
  """Trains a fresh member of the config for `steps` steps (one compiled epoch) on the devices
  present; its loss on the first 2 batches of the data set before and after, and the seconds."""
  dataset = data.load(config.data)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.member)
  learner = learners.create(config, dataset, placement.device_data(dataset, mesh), mesh)
  state = learner.init(jax.random.key(0))
  batch = config.train.batch_size
  held = slice(0, 2 * batch)
  loss = lambda s: learner.evaluate(s, dataset.train_images[held],
                                    dataset.train_labels[held])['loss']
  before = loss(state)
  n = steps * batch
  indices = np.arange(n, dtype=np.int32)[None]
  weights = np.ones((1, n), np.float32)
  began = time.perf_counter()
  opt_state = state.opt_state if state.opt_state is not None else learner.init_optimizer(
      state.variables)
  # The first `steps` of a round over one mega-batch, started as `MemberLearner.fit` starts one
  # (of a round of `steps` alone, the first would be at the peak rate, untrained).
  opt_state = learner.start_round(
      opt_state, len(dataset.train_labels) // config.stream.num_megabatches)
  variables, _ = learner.trainer.train_epoch(
      state.variables, opt_state, learner.data.train_images, learner.data.train_labels,
      indices, weights, n, jax.random.split(jax.random.key(1), 1), 0)
  jax.block_until_ready(variables)
  seconds = time.perf_counter() - began
  leaves = jax.tree.leaves(variables['params'])
  split = sum(leaf.nbytes for leaf in leaves if not leaf.sharding.is_fully_replicated)
  return {'steps': steps, 'batch': batch, 'loss_before': before,
          'loss_after': loss(state.replace(variables=variables)),
          'seconds_with_compile': seconds,
          'share_of_parameter_bytes_split': split / sum(leaf.nbytes for leaf in leaves)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'lm.py:gpt2_medium'))
  parser.add_argument('--out', default=os.path.join(
      ROOT, 'experiments', 'results', f'fsdp_{jax.default_backend()}.json'))
  parser.add_argument('--train_steps', type=int, default=4,
                      help='then train the last setting, sharded, for this many steps')
  args = parser.parse_args()
  began = time.perf_counter()
  results = {}
  for setting, overrides in SETTINGS:
    for shard in (False, True):
      config = alma_config.load(args.config)
      config.mesh.shard_params = shard
      config.update_from_flattened_dict(overrides)
      name = f"{setting}_{'sharded' if shard else 'replicated'}"
      results[name] = epoch_memory(config)
      print(name, results[name], flush=True)
    sharded, replicated = results[f'{setting}_sharded'], results[f'{setting}_replicated']
    total = lambda r: r['argument_bytes'] + r['temp_bytes']
    results[f'{setting}_ratio_arguments'] = (sharded['argument_bytes']
                                             / replicated['argument_bytes'])
    results[f'{setting}_ratio_arguments_and_temporaries'] = total(sharded) / total(replicated)
  results['as_configured_sharded_vs_unscanned_replicated'] = (
      total(results['as_configured_sharded']) / total(results['unscanned_replicated']))
  if args.train_steps:
    results['short_sequences_sharded_trained'] = train(config, args.train_steps)
  results['script_seconds'] = time.perf_counter() - began
  results['peak_host_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  common.write_result({**common.environment(), 'config': args.config, **results}, args.out)


if __name__ == '__main__':
  main()
