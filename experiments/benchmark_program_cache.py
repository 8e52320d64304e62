"""Whether a run could skip tracing and lowering its programs: the demo's compiled epoch made
ready to run in a fresh process, three ways, with every cache filled:

    python experiments/benchmark_program_cache.py [--repeats=3]

  traced      as a run does: traced and lowered, the executable loaded from JAX's persistent
              compilation cache;
  exported    a `jax.export`ed program (traced and lowered once, serialized) read back: its
              call lowered, the executable loaded from the compilation cache (needs the
              `flatbuffers` package, which alma_jax does not; left out without it);
  serialized  the executable itself (`jax.experimental.serialize_executable`) read back.

Each child process builds the demo's learner (configs/fashion_mnist.py) and a member's epoch
over 5400 examples as a round of it trains, then times the epoch's first call and its second:
the difference is what making the program ready cost. The program is the run's epoch called
through a jit over its flattened arguments (what export and serialization take), which
donates none of them; the ways take turns going first. Medians over the repeats; writes
experiments/results/program_cache_<backend>.json. Why alma_jax keeps no cache of traced
programs or executables: docs/performance.md, Start-up.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time

import common
import jax
import numpy as np

from alma_jax import backend, config as alma_config, data, learners, sharding, steps
from alma_jax.placement import device_data

ROOT = common.ROOT
WAYS = ('traced', 'exported', 'serialized')
EXAMPLES = 5400  # a demo round's training examples (a tenth of Fashion-MNIST, less validation)


def epoch_program(cache: str):
  """The demo learner's compiled epoch (a jitted function) and the arguments of a member's
  first epoch, flattened: (program, leaves, treedef, mesh)."""
  config = alma_config.load(os.path.join(ROOT, 'configs', 'fashion_mnist.py'))
  config.backend.compilation_cache = cache
  config.data.cache_dir = cache + '_data'
  backend.configure(config.backend)
  dataset = data.load(config.data)
  mesh = sharding.make_mesh()
  learner = learners.create(learners.with_defaults(config), dataset,
                            device_data(dataset, mesh), mesh)
  trainer = learner.trainer
  indices, n = steps.pad_indices(np.arange(EXAMPLES)[None], trainer.batch_size)
  weights = (np.arange(indices.shape[1]) < n).astype(np.float32)[None]
  variables = learner.new_members(jax.random.key(0), 1)
  variables, opt_state = trainer.place(variables, learner.start_round(
      learner.init_optimizer(variables), n))
  arguments = (variables, opt_state, learner.data.train_images, learner.data.train_labels,
               indices, weights, np.int32(n), jax.random.split(jax.random.key(1), 1),
               np.int32(0), None)
  leaves, tree = jax.tree.flatten(arguments)
  return trainer._epochs[False], leaves, tree, mesh


def child(way: str, folder: str) -> dict:
  program, leaves, tree, mesh = epoch_program(os.path.join(folder, 'cache'))

  def flat(*leaves):
    return jax.tree.leaves(program(*jax.tree.unflatten(tree, leaves)))

  exported_path = os.path.join(folder, 'epoch.exported')
  serialized_path = os.path.join(folder, 'epoch.executable')
  with sharding.activations(mesh):
    if way == 'write':  # fills the compilation cache for the traced and exported ways
      from jax import export
      from jax.experimental import serialize_executable
      if _can_export():
        exported = export.export(jax.jit(flat))(*leaves)
        with open(exported_path, 'wb') as f:
          f.write(exported.serialize())
        jax.block_until_ready(jax.jit(exported.call)(*leaves))
      compiled = jax.jit(flat).lower(*leaves).compile()
      with open(serialized_path, 'wb') as f:
        pickle.dump(serialize_executable.serialize(compiled), f)
      jax.block_until_ready(jax.jit(flat)(*leaves))
      return {}
    began = time.perf_counter()
    if way == 'traced':
      run = jax.jit(flat)
    elif way == 'exported':
      from jax import export
      with open(exported_path, 'rb') as f:
        run = jax.jit(export.deserialize(bytearray(f.read())).call)
    else:
      from jax.experimental import serialize_executable
      with open(serialized_path, 'rb') as f:
        run = serialize_executable.deserialize_and_load(*pickle.load(f))
    with backend.Compilations() as compiled:
      jax.block_until_ready(run(*leaves))
    first = time.perf_counter() - began
    began = time.perf_counter()
    with backend.no_compilation(f'the {way} epoch, called again'):
      jax.block_until_ready(run(*leaves))
    again = time.perf_counter() - began
  return {'first_call_s': first, 'second_call_s': again, 'ready_s': first - again,
          'programs_loaded': compiled.loaded, 'programs_compiled': compiled.count - compiled.loaded}


def _can_export() -> bool:
  return importlib.util.find_spec('flatbuffers') is not None


def run_child(way: str, folder: str) -> dict:
  out = subprocess.run([sys.executable, __file__, f'--child={way}', f'--folder={folder}'],
                       capture_output=True, text=True, cwd=ROOT)
  lines = out.stdout.strip().splitlines()
  if out.returncode or not lines:
    raise RuntimeError(f'{way} failed (exit status {out.returncode}):\n{out.stderr[-3000:]}')
  return json.loads(lines[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default='')
  parser.add_argument('--child', choices=('write',) + WAYS, help=argparse.SUPPRESS)
  parser.add_argument('--folder', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.child, args.folder)))
    return
  if args.repeats < 1:
    parser.error(f'--repeats={args.repeats}: at least one')
  with tempfile.TemporaryDirectory() as folder:
    run_child('write', folder)
    runs = {way: [] for way in WAYS if way != 'exported' or _can_export()}
    ways = list(runs)
    for repeat in range(args.repeats):
      for way in ways[repeat % len(ways):] + ways[:repeat % len(ways)]:
        runs[way].append(run_child(way, folder))
  for way, measured in runs.items():
    if any(r['programs_compiled'] for r in measured):
      raise RuntimeError(f'the {way} epoch compiled with every cache filled: {measured}')
  result = {**common.environment(), 'config': 'configs/fashion_mnist.py',
            'examples': EXAMPLES, 'runs': runs,
            'median_ready_s': {way: statistics.median(r['ready_s'] for r in measured)
                               for way, measured in runs.items()}}
  for way, seconds in result['median_ready_s'].items():
    print(f'{way}: the epoch ready to run in {seconds:.3f} s (median)')
  common.write_result(result, args.out or os.path.join(
      ROOT, 'experiments', 'results', f'program_cache_{jax.default_backend()}.json'))


if __name__ == '__main__':
  main()
