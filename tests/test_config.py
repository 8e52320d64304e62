import glob
import os
import subprocess
import sys

import pytest

from alma_jax import config as alma_config, learners, models, optim
from conftest import REPO

load_config_file = alma_config.load


CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))


def validate(c):
  alma_config.validate(c, learners.names(), models.names(), optim.names())


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
@pytest.mark.parametrize('variant', ['', 'tiny'])
def test_every_config_file_loads_and_validates(path, variant):
  validate(load_config_file(f'{path}:{variant}'))


def test_config_files_exist():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert {'mnist.py', 'fashion_mnist.py'} <= names


@pytest.mark.parametrize('key,value,message', [
    ('learner.name', 'magic', 'config.learner.name'),
    ('stream.replay', 'sometimes', 'config.stream.replay'),
    ('stream.waiting_time', 0, 'config.stream.waiting_time'),
    ('stream.waiting_time', 11, 'config.stream.waiting_time'),
    ('stream.replay_fraction', 1.5, 'config.stream.replay_fraction'),
    ('stream.num_megabatches', -1, 'config.stream.num_megabatches'),
    ('train.batch_size', -128, 'config.train.batch_size'),
    ('model.hidden', 0, 'config.model.hidden'),
    ('model.name', 'giant', 'config.model.name'),
    ('data.max_train_examples', -5, 'config.data.max_train_examples'),
    ('optimizer.learning_rate', float('nan'), 'config.optimizer.learning_rate'),
    ('optimizer.learning_rate', float('inf'), 'config.optimizer.learning_rate'),
    ('optimizer.momentum', float('nan'), 'config.optimizer.momentum'),
    ('optimizer.weight_decay', -0.1, 'config.optimizer.weight_decay'),
    ('train.patience_delta', float('nan'), 'config.train.patience_delta'),
    ('data.std', (0.0,), 'config.data.std'),
    ('data.num_classes', 0, 'config.data.num_classes'),
    ('stream.permutation_seed', -1, 'config.stream.permutation_seed'),
])
def test_bad_values_name_the_key(key, value, message):
  c = load_config_file(os.path.join(REPO, 'configs', 'fashion_mnist.py'))
  section, name = key.split('.')
  c[section][name] = value
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    validate(c)


def run_main(*args, timeout=120):
  return subprocess.run([sys.executable, '-m', 'alma_jax.main', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def test_unknown_override_key_fails_before_any_work(tmp_path):
  out = run_main('--config=configs/fashion_mnist.py', f'--workdir={tmp_path}/run',
                 '--config.stream.wait=3')
  assert out.returncode != 0 and 'wait' in out.stderr
  assert not os.path.exists(tmp_path / 'run')


def test_impossible_waiting_time_fails_before_any_work(tmp_path):
  out = run_main('--config=configs/fashion_mnist.py', f'--workdir={tmp_path}/run',
                 '--config.stream.waiting_time=20')
  assert out.returncode != 0 and 'config.stream.waiting_time=20' in out.stderr
  assert not os.path.exists(tmp_path / 'run')


def test_a_nan_saved_and_given_again_is_no_protocol_change():
  nan = float('nan')
  given = lambda rate: {'optimizer': {'learning_rate': rate}}
  assert alma_config.protocol_differences(given(nan), given(nan)) == []
  assert alma_config.protocol_differences(given(nan), given(1.0)) == ['optimizer.learning_rate']
