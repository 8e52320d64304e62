"""A learner added from a module outside the repository (docs/examples/anchored_finetune.py):
chosen by name, run by the CLI, read back by analysis, and its loss hook doing what it says."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np

from alma_jax import data as alma_data, learners, sharding
from alma_jax.placement import device_data
from conftest import REPO
from test_learners import first_round

EXAMPLE = os.path.join(REPO, 'docs', 'examples', 'anchored_finetune.py')


def outside(tmp_path):
  """The example module copied to a folder outside the repository, importable from there."""
  folder = tmp_path / 'my_code'
  folder.mkdir()
  shutil.copy(EXAMPLE, folder)
  sys.path.insert(0, str(folder))
  return folder


def main_in(folder, config, *flags: str) -> subprocess.CompletedProcess:
  """`python -m alma_jax.main --config=my_config.py --workdir=run FLAGS` in `folder` (whose
  modules are importable), `my_config.py` rebuilding `config`."""
  (folder / 'my_config.py').write_text(
      'import ml_collections\n'
      f'def get_config(variant=""):\n  return ml_collections.ConfigDict({config.to_dict()!r})\n')
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(folder), REPO])}
  return subprocess.run([sys.executable, '-m', 'alma_jax.main', '--config=my_config.py',
                         '--workdir=run', *flags], cwd=folder, env=env, capture_output=True,
                        text=True, timeout=300)


def test_a_learner_from_outside_runs_from_the_command_line_and_is_read_back(config, tmp_path):
  folder = outside(tmp_path)
  config.extensions = ('anchored_finetune',)
  config.learner.name = 'anchored_finetune'
  config.learner.anchor_strength = 0.1
  config.stream.num_megabatches = 3
  done = main_in(folder, config, '--config.learner.anchor_strength=0.2')
  assert done.returncode == 0, done.stderr
  saved = json.load(open(folder / 'run' / 'config.json'))
  assert saved['learner']['anchor_strength'] == 0.2 and saved['train']['patience'] == 2
  from alma_jax import analyze
  run = analyze.Run(str(folder / 'run'))  # imports the extension named in config.json
  errors = [row['test_error'] for row in run.rows()]
  assert errors[-1] < 0.8  # chance is 0.9: it learns
  assert run.evaluate(3)['error'] == errors[-1]


def test_a_strong_anchor_keeps_the_second_round_near_the_first(config, tmp_path):
  outside(tmp_path)
  config.extensions = ('anchored_finetune',)
  config.learner.name = 'anchored_finetune'
  moved = {}
  for strength in (0.0, 10.0):
    config.learner.anchor_strength = strength
    dataset = alma_data.load(config.data)
    mesh = sharding.make_mesh()
    learner = learners.create(config, dataset, device_data(dataset, mesh), mesh)
    r = first_round(dataset, config)
    first, _ = learner.train_round(learner.init(jax.random.key(0)), r, jax.random.key(1))
    second, _ = learner.train_round(first, r, jax.random.key(2))
    moved[strength] = sum(float(np.sum((a - b) ** 2)) for a, b in zip(
        jax.tree.leaves(first.variables['params']),
        jax.tree.leaves(second.variables['params'])))
  assert moved[10.0] < 0.1 * moved[0.0]


SOURCE = '''
from alma_jax import data
data.register_source('mirrored', lambda c: {
    split: (images[:, :, ::-1], labels) for split, (images, labels) in data.SOURCES['idx'](c).items()})
'''

READ_BACK = '''
import json, sys
from alma_jax import analyze
run = analyze.Run({workdir!r})  # a fresh process: nothing imported the source but this
print(json.dumps({{'logged': run.rows()[-1]['test_error'], 'evaluated': run.evaluate(2)['error']}}))
'''


def test_a_run_over_a_data_source_from_outside_is_read_back(config, tmp_path):
  """(analysis loaded the data before importing the run's extensions: an unknown source)"""
  folder = tmp_path / 'my_code'
  folder.mkdir()
  (folder / 'mirrored_source.py').write_text(SOURCE)
  config.extensions = ('mirrored_source',)
  config.data.source = 'mirrored'
  config.stream.num_megabatches = 2
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(folder), REPO])}
  script = ('import ml_collections\nfrom alma_jax import run\n'
            f'run.run(ml_collections.ConfigDict({config.to_dict()!r}), {str(tmp_path / "run")!r})')
  for code in (script, READ_BACK.format(workdir=str(tmp_path / 'run'))):
    done = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
  read = json.loads(done.stdout.strip().splitlines()[-1])
  assert read['evaluated'] == read['logged']


MODEL = '''
import flax.linen as nn
from alma_jax import models

class Deep(nn.Module):
  num_classes: int = 10
  depth: int = 1

  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape((x.shape[0], -1))
    for _ in range(self.depth):
      x = nn.relu(nn.Dense(8)(x))
    return nn.Dense(self.num_classes)(x)

models.register('deep', Deep)
'''


def test_a_models_own_keys_from_outside_are_set_on_the_command_line(config, tmp_path):
  """(the command line looked up `model.depth` before importing the module that registers
  the model: 'has no key')"""
  folder = tmp_path / 'my_code'
  folder.mkdir()
  (folder / 'deep_model.py').write_text(MODEL)
  config.stream.num_megabatches = 2
  done = main_in(folder, config, "--config.extensions=('deep_model',)",
                 '--config.model.name=deep', '--config.model.depth=2', '--dry_run')
  assert done.returncode == 0, done.stderr
  plan = json.loads(done.stdout)
  assert plan['config']['model'] == {'name': 'deep', 'depth': 2}
  assert plan['plan']['params_at_start'] == 144 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10
