"""Data on the devices or streamed from the hosts: the same runs either way."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from alma_jax import run
from conftest import REPO, devices_env
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
                       env=devices_env(8),
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
                       env=devices_env(8),
                       timeout=120, check=True)
  assert 'config.train.eval_batch_size=1001' in out.stdout
  assert 'the 8 devices of the data axis' in out.stdout


HOST_BLOCKS = '''
import json
import jax, jax.numpy as jnp, numpy as np
from alma_jax import sharding, steps
from alma_jax.placement import DataArrays
mesh = sharding.make_mesh()
metric = lambda model, images, labels, weights: {
    'sum': jnp.sum(weights * labels), 'count': jnp.sum(weights)}
evaluator = steps.Evaluator(metric, 10, mesh)  # blocks of 10 over 4 devices
images, labels = np.zeros((100, 2), np.float32), np.arange(100, dtype=np.int32)
indices = np.arange(3, 40)
on_devices = [sharding.global_array(a, sharding.replicated(mesh)) for a in (images, labels)]
print(json.dumps({'host': {k: int(v) for k, v in evaluator({}, images, labels, indices).items()},
                  'device': {k: int(v) for k, v in evaluator({}, *on_devices, indices).items()}}))
'''


def test_blocks_that_do_not_split_over_the_devices_are_evaluated_from_the_host_too():
  """Analysis evaluates given (host) data on whatever mesh it has: a block of 10 on 4 devices
  is evaluated whole on each, as device-resident data is (it failed to split)."""
  out = subprocess.run([sys.executable, '-c', HOST_BLOCKS], cwd=REPO,
                       env=devices_env(4),
                       capture_output=True, text=True, timeout=120, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['host'] == result['device'] == {'sum': sum(range(3, 40)), 'count': 37}


GROWING = '''
import json, sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
from conftest import tiny_config
from alma_jax import backend, data, learners, placement, sharding
config = tiny_config({idx_dir!r})
config.learner.update(name='k_ensemble', num_members=3)
config.mesh.member = 2
dataset = data.load(config.data)
mesh = sharding.make_mesh(member=2)
learner = learners.create(config, dataset, placement.device_data(dataset, mesh), mesh)
state = learner.init(jax.random.key(0))
learner.evaluate(state)  # 3 members, padded to 4
grown = state.replace(variables=learner.new_members(jax.random.key(1), 4),
                      member_weights=np.ones(4, np.float32))
with backend.Compilations() as compiled:
  learner.evaluate(grown)
print(json.dumps({{'members': [3, int(grown.member_weights.shape[0])],
                   'compiled': compiled.count}}))
'''


def test_a_stack_grown_within_its_power_of_two_evaluates_without_compiling(idx_dir):
  """Over a member axis of 2, 3 members padded to 4 came out whole on every device and 4
  split over the axis: two shardings, two compilations of one evaluation."""
  script = GROWING.format(tests=os.path.join(REPO, 'tests'), idx_dir=idx_dir)
  out = subprocess.run([sys.executable, '-c', script], cwd=REPO,
                       env=devices_env(4),
                       capture_output=True, text=True, timeout=120, check=True)
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {'members': [3, 4], 'compiled': 0}
