"""Training throughput with the data streamed from host memory vs resident on the devices.

    python experiments/benchmark_streaming.py [--config=configs/lm.py] [--steps=200] [--repeats=3]

Trains the same epochs of the config's learner (the same examples, order and steps) with the
data set on the devices (`data.placement=device`: one compiled loop per epoch) and on the host
(`host`: a compiled call per `data.feed_steps` batches, gathered by Grain `data.prefetch` feeds
ahead; with prefetch 0, gathered when the call asks for them; and with a compiled call per
step). A first epoch of each compiles; the timed
epochs run with no compilation allowed, the placements interleaved; the best of `repeats` is
kept. Writes experiments/results/streaming_<backend>.json.
"""
from __future__ import annotations

import time

import common
import jax

from alma_jax import backend, learners, placement, sharding


def epochs(config, dataset, where: str, num_steps: int):
  """A function that runs epoch e of the config's learner over `num_steps` batches with the
  data placed `where`, and returns its seconds."""
  mesh = sharding.make_mesh()
  data = (placement.device_data(dataset, mesh) if where == 'device' else
          placement.DataArrays(dataset.train_images, dataset.train_labels, dataset.test_images,
                               dataset.test_labels))
  learner = learners.create(config, dataset, data, mesh)
  epoch, variables, opt_state, n = common.member_epoch(
      learner, min(num_steps * config.train.batch_size, len(dataset.train_labels)))
  state = list(learner.trainer.place(variables, opt_state))

  def run(e: int) -> float:
    began = time.perf_counter()
    state[:] = epoch(*state, e)
    jax.block_until_ready(state)
    return time.perf_counter() - began

  return run, n


def main():
  args, c, dataset = common.lm_script(__doc__, '', steps=200, repeats=3)
  feed_steps, prefetch = c.data.feed_steps, c.data.prefetch
  variants = {'device': ('device', prefetch, feed_steps),
              'host': ('host', prefetch, feed_steps),
              'host_no_prefetch': ('host', 0, feed_steps),
              'host_one_step_per_call': ('host', prefetch, 1)}
  runs, first = {}, {}
  for name, (where, c.data.prefetch, c.data.feed_steps) in variants.items():
    runs[name], n = epochs(c, dataset, where, args.steps)
    first[name] = common.first_call(runs[name], 0)[1]  # compiles (or loads from the cache)
  best = {name: float('inf') for name in variants}
  with backend.no_compilation('the timed epochs'):
    for repeat in range(args.repeats):
      for name in variants:
        best[name] = min(best[name], runs[name](repeat + 1))
  tokens = n * dataset.targets_per_example
  result = {
      'config': args.config, **common.environment(),
      'steps': n // c.train.batch_size, 'batch': c.train.batch_size,
      'tokens_per_epoch': tokens, 'data_bytes': placement.data_bytes(dataset),
      'prefetch': prefetch, 'feed_steps': feed_steps, 'repeats': args.repeats,
      'first_epoch': first,
      'epoch_seconds': best,
      'tokens_per_second': {name: tokens / s for name, s in best.items()},
      'host_over_device': best['device'] / best['host'],
      'host_no_prefetch_over_device': best['device'] / best['host_no_prefetch'],
      'host_one_step_per_call_over_device': best['device'] / best['host_one_step_per_call'],
  }
  common.write_result(result, args.out or
                      f'experiments/results/streaming_{jax.default_backend()}.json')


if __name__ == '__main__':
  main()
