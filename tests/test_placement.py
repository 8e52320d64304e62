"""Data on the devices or streamed from the hosts: the same runs either way."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from alma_jax import run
from conftest import REPO
from test_conv import conv_config


def rows(workdir):
  return [json.loads(line) for line in open(workdir / 'metrics.jsonl')]


def scores(workdir):
  return [(r['test_loss'], r['test_error'], r['params']) for r in rows(workdir)]


# Learners that read the data outside the trainer too: boosting (its members' mistakes, epochs
# drawn by weight), gMoE (expert usage), Firefly (candidate neurons scored on batches).
@pytest.mark.parametrize('learner,model', [('finetune', 'mlp'), ('boosting', 'mlp'),
                                           ('gmoe', 'moe_mlp'), ('firefly', 'mlp')])
def test_streamed_data_gives_the_runs_of_device_resident_data(config, tmp_path, learner, model):
  config.learner.name = learner
  config.model.name = model
  config.stream.num_megabatches = 2  # the growing learners grow before round 2
  config.train.update(max_epochs=2, patience=2)
  summaries = {}
  for where in ('device', 'host'):
    config.data.placement = where
    summaries[where] = run.run(config, str(tmp_path / where))
    assert summaries[where]['data_placement'] == where
  assert scores(tmp_path / 'host') == scores(tmp_path / 'device')
  assert summaries['host']['train_flops'] == summaries['device']['train_flops']


def test_a_streamed_vgg_with_augmentation_and_batchnorm_gives_the_resident_run(config, tmp_path):
  """Random crops and flips drawn from the same keys; BatchNorm statistics over the same
  batches. On CPU the resident path runs convolutions a compiled call per step: fed one step a
  call too, the streamed run is the same programs on the same batches, bit for bit."""
  config = conv_config(config)
  config.data.feed_steps = 1
  for where in ('device', 'host'):
    config.data.placement = where
    run.run(config, str(tmp_path / where))
  assert scores(tmp_path / 'host') == scores(tmp_path / 'device')


def test_automatic_placement_streams_data_larger_than_the_device_budget(config, tmp_path):
  dataset_bytes = 1200 * 144 + 1200 * 4 + 400 * 144 + 400 * 4  # the synthetic set
  config.stream.num_megabatches = 2
  config.data.device_memory = dataset_bytes // 4
  assert run.plan(config)['data_placement'] == 'host'
  assert run.run(config, str(tmp_path / 'small_budget'))['data_placement'] == 'host'
  config.data.device_memory = dataset_bytes
  assert run.plan(config)['data_placement'] == 'device'


def test_a_run_resumes_with_its_data_placed_elsewhere(config, tmp_path):
  """Started with the data on the devices, stopped after arrival 2, resumed streaming."""
  config.stream.num_megabatches = 4
  run.run(config, str(tmp_path / 'straight'))
  shutil.copytree(tmp_path / 'straight', tmp_path / 'moved')
  for t in (3, 4):
    shutil.rmtree(tmp_path / 'moved' / 'checkpoints' / str(t))
  for name in (run.METRICS_FILE, run.SUMMARY_FILE):  # the rows must come from the resumed run
    os.remove(tmp_path / 'moved' / name)
  config.data.update(placement='host', prefetch=0, feed_steps=3)
  assert run.run(config, str(tmp_path / 'moved'))['data_placement'] == 'host'
  assert scores(tmp_path / 'moved') == scores(tmp_path / 'straight')


GLOBAL_BATCH = '''
import json
import jax, numpy as np
from alma_jax import placement, sharding

class CountingArray(np.ndarray):
  """A host array that records how many rows each read asks for."""
  reads = []

  def __getitem__(self, index):
    if isinstance(index, np.ndarray):
      CountingArray.reads.append(int(index.size))
    return np.asarray(super().__getitem__(index))

mesh = sharding.make_mesh(member={member})
host = np.arange(40 * 3, dtype=np.float32).reshape(40, 3).view(CountingArray)
indices = np.array([[5, 1, 7, 3, 9, 11, 13, 0], [2, 4, 6, 8, 10, 12, 14, 16]])
batch = placement.global_batch(host, indices, sharding.members_batch_sharded(mesh, 2))
print(json.dumps({{'same': bool(np.array_equal(np.asarray(batch), np.asarray(host)[indices])),
                  'reads': CountingArray.reads, 'shards': len(batch.addressable_shards)}}))
'''


@pytest.mark.parametrize('member', [1, 2])
def test_a_global_batch_reads_each_devices_rows_alone(member):
  """On 8 devices, each device's shard of a batch of 2 members x 8 examples is read from the
  host array by itself (8 / data rows of each member it holds): in a multi-process run a
  process reads only its own devices' rows of every global batch."""
  out = subprocess.run([sys.executable, '-c', GLOBAL_BATCH.format(member=member)], cwd=REPO,
                       env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8'),
                       capture_output=True, text=True, timeout=120, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  data = 8 // member
  assert result['same'] and result['shards'] == 8
  assert result['reads'] == [(2 // member) * (8 // data)] * 8


def test_evaluation_blocks_that_do_not_split_over_the_devices_are_refused_before_work(idx_dir):
  script = f"""
import sys
sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
from conftest import tiny_config
from alma_jax import run
config = tiny_config({idx_dir!r})
config.data.placement = 'host'
config.train.eval_batch_size = 1001
try:
  run.plan(config)
except ValueError as error:
  print(error)
"""
  out = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8'),
                       timeout=120, check=True)
  assert 'config.train.eval_batch_size=1001' in out.stdout
  assert 'the 8 devices of the data axis' in out.stdout
