"""Data and member parallelism over fake CPU devices, two processes, and topology changes.

Runs on N devices are compared with runs on 1: gradients and test sums are added in another
order over shards, so losses agree to float32 rounding (relative 1e-4) and errors to within two
of the 400 test examples.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from alma_jax import analyze, checkpoint, config as alma_config, run, sharding
from alma_jax import workdir as workdirs
from conftest import REPO, checkpoint_data_files, devices_env, tiny_config

SCRIPT = '''
import json, sys
sys.path.insert(0, {tests!r})
import jax
if {coordinator!r}:
  jax.distributed.initialize({coordinator!r}, {processes}, {process})
from conftest import tiny_config
from alma_jax import run
{prelude}
config = tiny_config({data!r})
config.stream.num_megabatches = 3
config.train.update(max_epochs=3, patience=3)
config.learner.update(name={learner!r}, **{options!r})
config.mesh.member = {member}
config.mesh.shard_params = {shard_params}
config.data.placement = {placement!r}
summary = run.run(config, {workdir!r})
if jax.process_index() == 0:
  rows = [json.loads(l) for l in open({workdir!r} + '/metrics.jsonl')]
  print(json.dumps({{'devices': jax.device_count(), 'losses': [r['test_loss'] for r in rows],
                    'errors': [r['test_error'] for r in rows]}}))
'''


def command(idx_dir, workdir, learner='finetune', member=1, coordinator='', processes=1,
            process=0, shard_params=False, placement='device', prelude=''):
  options = {'num_members': 4} if learner == 'k_ensemble' else {}
  script = SCRIPT.format(tests=os.path.join(REPO, 'tests'), data=idx_dir, workdir=str(workdir),
                         learner=learner, options=options, member=member, coordinator=coordinator,
                         processes=processes, process=process, shard_params=shard_params,
                         placement=placement, prelude=prelude)
  return [sys.executable, '-c', script]


def run_with_devices(n, idx_dir, workdir, **kwargs):
  out = subprocess.run(command(idx_dir, workdir, **kwargs), cwd=REPO, env=devices_env(n),
                       capture_output=True, text=True, timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def assert_same_run(a, b):
  for x, y in zip(a['losses'], b['losses'], strict=True):
    assert abs(x - y) <= 1e-4 * max(1.0, abs(x))
  for x, y in zip(a['errors'], b['errors'], strict=True):
    assert abs(x - y) <= 2 / 400


@pytest.mark.parametrize('placement', ['device', 'host'])  # 'host': batches fed from the host
def test_eight_devices_of_data_parallelism_match_one(idx_dir, tmp_path, placement):
  one = run_with_devices(1, idx_dir, tmp_path / 'one')
  eight = run_with_devices(8, idx_dir, tmp_path / 'eight', placement=placement)
  assert one['devices'] == 1 and eight['devices'] == 8
  assert_same_run(one, eight)


def test_parameters_sharded_over_eight_devices_match_one_and_restore_on_one(idx_dir, tmp_path):
  """FSDP: 2 members x 4 data devices, each member's parameters and optimizer state split over
  the data axis; the checkpoint restores here, on 1 device, and on 2 (split over their data
  axis), and evaluates as logged."""
  one = run_with_devices(1, idx_dir, tmp_path / 'one', learner='k_ensemble')
  eight = run_with_devices(8, idx_dir, tmp_path / 'eight', learner='k_ensemble', member=2,
                           shard_params=True)
  assert_same_run(one, eight)
  written = analyze.Run(str(tmp_path / 'eight'))
  assert written.evaluate(3)['error'] == eight['errors'][-1]
  script = (f'import jax; from alma_jax import analyze; '
            f'print(jax.device_count(), analyze.Run({str(tmp_path / "eight")!r}).evaluate(3))')
  out = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=devices_env(2),
                       capture_output=True, text=True, timeout=300, check=True)
  devices, evaluated = out.stdout.strip().splitlines()[-1].split(' ', 1)
  assert devices == '2' and f"'error': {eight['errors'][-1]}" in evaluated


def tiny_lm_run(workdir: str, shard_params: bool, placement: str = 'device') -> dict:
  """The tiny LM with 2 scanned blocks, two arrivals, its data on the devices or streamed from
  the host (`placement`): devices, test losses and errors, and the share of the checkpointed
  learner state's bytes that device 0 holds after a restore."""
  config = alma_config.load(os.path.join(REPO, 'configs', 'lm.py:tiny'))
  config.log.tensorboard = False
  config.stream.num_megabatches = 2
  config.train.max_epochs = 1
  config.model.update(depth=2, scan_blocks=True)
  config.mesh.shard_params = shard_params
  config.data.placement = placement
  assert run.run(config, workdir)['data_placement'] == placement
  rows = [json.loads(line) for line in open(os.path.join(workdir, run.METRICS_FILE))]
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), mesh=sharding.make_mesh(),
                               shard_params=shard_params) as checkpointer:
    arrays = [a for a in jax.tree.leaves(checkpointer.restore(2)['learner'])
              if isinstance(a, jax.Array)]
  on_device_0 = sum(a.addressable_shards[0].data.nbytes for a in arrays)
  return {'devices': jax.device_count(), 'losses': [r['test_loss'] for r in rows],
          'errors': [r['test_error'] for r in rows],
          'restored_share': on_device_0 / sum(a.nbytes for a in arrays)}


def on_eight_devices(call: str) -> tuple[dict, str]:
  """`call` (an expression over this module's functions) in a process with 8 devices: its
  value, printed as JSON, and the process's output."""
  script = (f'import json, sys; sys.path.insert(0, {os.path.join(REPO, "tests")!r}); '
            f'from test_sharding import *; print(json.dumps({call}))')
  out = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=devices_env(8),
                       capture_output=True, text=True, timeout=600, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout


def test_a_language_model_with_scanned_blocks_sharded_over_eight_devices_matches_one(tmp_path):
  """FSDP of a transformer whose blocks are one scanned layer (parameters stacked, gathered a
  block at a time; activations split over the batch), its sequences streamed from the host
  (the pod recipe's setting): the 8-device run is the 1-device run (here, in this process, the
  data on the device); its checkpoint restores sharded there (a state that fits only sharded
  resumes) and evaluates here as logged."""
  eight, _ = on_eight_devices(f'tiny_lm_run({str(tmp_path / "eight")!r}, True, "host")')
  one = tiny_lm_run(str(tmp_path / 'one'), False)
  assert (one['devices'], eight['devices']) == (1, 8)
  assert one['restored_share'] == 1 and eight['restored_share'] < 0.2
  assert_same_run(one, eight)
  written = analyze.Run(str(tmp_path / 'eight'))
  assert written.evaluate(2)['loss'] == pytest.approx(eight['losses'][-1], rel=1e-5)


def pallas_attention_on_a_mesh() -> dict:
  """Gradients of 3 members' causal attention (8 sequences each) on a (member 1, data 8) mesh,
  by Pallas's kernel (its interpreter) run on each device's own sequences, and by XLA's."""
  import functools
  import jax.numpy as jnp
  from alma_jax.models import transformer
  q, k, v, cotangent = jax.random.normal(jax.random.key(0), (4, 3, 8, 32, 2, 16))
  pallas = transformer._on_each_device(
      functools.partial(transformer._pallas_attention, interpret=True))
  grads, jaxprs = [], []
  for attention in (pallas, transformer._xla_attention):
    members = jax.vmap(attention, spmd_axis_name=sharding.MEMBER)
    loss = lambda q, k, v, f=members: jnp.sum(f(q, k, v) * cotangent)
    with sharding.activations(sharding.make_mesh(data=8, member=1)):
      grads.append(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
      jaxprs.append(str(jax.make_jaxpr(jax.grad(loss))(q, k, v)))
  return {'max_difference': max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(*grads)),
          'shard_map': ['shard_map' in j for j in jaxprs],
          'pallas': ['pallas_call' in j for j in jaxprs],
          'split_over_members_and_data': "in_specs=(P('member', 'data')" in jaxprs[0]}


def test_pallas_attention_runs_on_each_devices_own_sequences():
  """Pallas's kernel has no partitioning rule; on a mesh each device runs it on its share of
  the batch (shard_map; members are not split over devices then): XLA's gradients."""
  result, _ = on_eight_devices('pallas_attention_on_a_mesh()')
  assert result['shard_map'] == [True, False] and result['pallas'] == [True, False]
  assert result['split_over_members_and_data']
  assert result['max_difference'] < 5e-6


GROWN_AND_BATCHNORM = {  # learner, its options, model, arrivals (every shape grown compiles anew)
    'vgg': ('finetune', {}, dict(name='vgg', width=8, blocks=(1, 1, 1, 1, 1)), 3),  # BatchNorm
    'resnet': ('finetune', {}, dict(name='resnet18', width=8), 2),  # BatchNorm, residuals
    'gmoe': ('gmoe', {}, dict(name='moe_mlp', hidden=16), 2),  # a mixture that grows experts
    'firefly': ('firefly', {'new_neurons': 8}, dict(name='mlp', hidden=16), 2),  # grows widths
}


def grown_or_batchnorm_config(idx_dir: str, case: str, shard_params: bool):
  """GROWN_AND_BATCHNORM[case], growing before every round after the first."""
  learner, options, model, arrivals = GROWN_AND_BATCHNORM[case]
  config = tiny_config(idx_dir)
  config.model = ml_collections.ConfigDict(model)
  if model['name'] == 'vgg':  # as test_conv: SGD with momentum
    config.data.pad_to = 32
    # (at test_conv's 0.01 this VGG stays at chance for 3 arrivals, its loss rising, and the
    # runs' sums in another order part by 1e-3 when compiled unoptimized, as the tests are)
    config.optimizer.update(name='sgd', learning_rate=0.05, momentum=0.9)
  config.learner.update(name=learner, **options)
  config.stream.num_megabatches = arrivals
  config.train.update(max_epochs=2, patience=2)
  if model['name'] == 'resnet18':
    # One epoch a round: near chance, which of two epochs validates best can flip with the
    # last bit of a sum, and with it the predictor (the loss at arrival 2 parted by 0.8%).
    config.optimizer.update(name='sgd', learning_rate=0.01, momentum=0.9)
    config.train.update(max_epochs=1, patience=1)
  config.mesh.shard_params = shard_params
  return config


def rows_of(workdir: str) -> dict:
  """The test losses, errors and parameter counts of a run's rows."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, run.METRICS_FILE))]
  return {key: [r[field] for r in rows] for key, field in (
      ('losses', 'test_loss'), ('errors', 'test_error'), ('params', 'params'))}


def grown_or_batchnorm_run(idx_dir: str, case: str, workdir: str, shard_params: bool) -> dict:
  """GROWN_AND_BATCHNORM[case] run in `workdir`: devices, and its rows."""
  run.run(grown_or_batchnorm_config(idx_dir, case, shard_params), workdir)
  return {'devices': jax.device_count(), **rows_of(workdir)}


@pytest.mark.parametrize('case', sorted(GROWN_AND_BATCHNORM))
def test_batchnorm_mixtures_and_grown_trees_sharded_over_eight_devices_match_one(idx_dir,
                                                                                 tmp_path, case):
  """FSDP over every kind of parameter tree: a VGG and a ResNet (BatchNorm statistics), a
  mixture that adds experts and a network that grows its widths (leaves the data axis no longer
  divides stay whole, as the run says) train on 8 devices as on 1, growing alike. The 8-device VGG, cut back
  to its checkpoint of arrival 2 (BatchNorm statistics included), resumes training here on 1
  device and ends as it did."""
  eight, output = on_eight_devices(
      f'grown_or_batchnorm_run({idx_dir!r}, {case!r}, {str(tmp_path / "eight")!r}, True)')
  if case == 'firefly':
    assert 'FSDP: after arrival 2 the data axis splits' in output
  one = grown_or_batchnorm_run(idx_dir, case, str(tmp_path / 'one'), False)
  assert (one['devices'], eight['devices']) == (1, 8)
  assert one['params'] == eight['params']
  assert len(set(one['params'])) > 1 or case in ('vgg', 'resnet')  # it grew
  assert_same_run(one, eight)
  if case != 'vgg':
    return
  resumed = tmp_path / 'resumed'
  shutil.copytree(tmp_path / 'eight', resumed)
  shutil.rmtree(resumed / 'checkpoints' / '3')
  for name in (run.METRICS_FILE, run.SUMMARY_FILE):  # the rows must come from the resumed run
    os.remove(resumed / name)
  kept = os.path.getmtime(resumed / 'checkpoints' / '2')
  run.run(grown_or_batchnorm_config(idx_dir, 'vgg', True), str(resumed))
  assert os.path.getmtime(resumed / 'checkpoints' / '2') == kept  # resumed, not rerun
  assert_same_run(rows_of(str(resumed)), eight)


MEMORY = '''
import json, sys
sys.path.insert(0, {tests!r})
import jax, jax.numpy as jnp
from conftest import tiny_config
from alma_jax import data, learners, placement, run, sharding
config = tiny_config({data!r})
config.model.update(hidden=1024, num_layers=4)
config.mesh.shard_params = {shard_params}
dataset = data.load(config.data)
mesh = sharding.make_mesh()
learner = learners.create(config, dataset, placement.device_data(dataset, mesh), mesh)
variables = learner.new_members(jax.random.key(0), 1)
opt_state = learner.init_optimizer(variables)
variables, opt_state = learner.trainer.place(variables, opt_state)
indices = jnp.zeros((1, 1024), jnp.int32)
weights = jnp.ones((1, 1024), jnp.float32)
keys = jax.random.split(jax.random.key(1), 1)
compiled = learner.trainer._epochs[False].lower(
    variables, opt_state, learner.data.train_images, learner.data.train_labels, indices, weights,
    1024, keys, 0, None).compile()
memory = compiled.memory_analysis()
shards = [s.data.nbytes for s in jax.tree.leaves(variables)[0].addressable_shards]
print(json.dumps({{'arguments': memory.argument_size_in_bytes,
                   'temporaries': memory.temp_size_in_bytes, 'parameter_shard': max(shards)}}))
'''


def test_the_share_of_parameters_split_over_data_names_the_leaves_fsdp_leaves_whole():
  """A leaf none of whose dimensions the data axis divides (a grown width of 33 or 18) stays
  whole on every device; `--dry_run`'s plan reports the share that is split."""
  members = {'grown': np.zeros((1, 33, 18)), 'first': np.zeros((1, 784, 64)),
             'bias': np.zeros((1, 64))}
  split = 784 * 64 + 64
  assert sharding.split_fraction(members, 8) == pytest.approx(split / (split + 33 * 18))
  assert sharding.split_fraction(members, 1) == 0.0
  assert sharding.split_fraction({'grown': np.zeros((8, 33, 18))}, 8) == 0.0  # not the members
  out = subprocess.run([sys.executable, '-m', 'alma_jax.main', '--dry_run',
                        '--config=configs/fashion_mnist.py:tiny',
                        '--config.mesh.shard_params=True'],
                       cwd=REPO, env=devices_env(8), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout)['plan']['params_split_over_data'] == pytest.approx(
      (55_050 - 10) / 55_050)  # all but the head's bias of 10


def test_sharded_parameters_take_an_eighth_of_the_memory_per_device(idx_dir):
  """A model whose parameters dominate (MLP, four hidden layers of 1024): per device, the
  compiled epoch's arguments (parameters, optimizer state, the data set) shrink by the
  parameters' share, to about 1/8 of it, and so does its memory with its temporaries (the
  gradients, a gathered layer; measured 0.129: with two hidden layers, one gathered layer is
  a larger share, 0.166)."""
  measured = {}
  for shard in (False, True):
    script = MEMORY.format(tests=os.path.join(REPO, 'tests'), data=idx_dir, shard_params=shard)
    out = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=devices_env(8),
                         capture_output=True, text=True, timeout=300, check=True)
    measured[shard] = json.loads(out.stdout.strip().splitlines()[-1])
  data_bytes = 1200 * 144 + 1200 * 4 + 400 * 144 + 400 * 4  # the synthetic set, replicated
  state = lambda m: m['arguments'] - data_bytes
  assert measured[True]['parameter_shard'] * 8 == measured[False]['parameter_shard']
  assert state(measured[True]) < 0.15 * state(measured[False])
  step = lambda m: m['arguments'] + m['temporaries']
  assert step(measured[True]) < 0.15 * step(measured[False])


LM_MEMORY = '''
import contextlib, json
import jax, jax.numpy as jnp
from alma_jax import config as alma_config, data, learners, placement, sharding
config = alma_config.load({config!r})
config.model.update(width=64, depth=2, context=128, scan_blocks=True)
config.data.sequence_length = 128
config.mesh.shard_params = True
dataset = data.load(config.data)
mesh = sharding.make_mesh()
learner = learners.create(config, dataset, placement.device_data(dataset, mesh), mesh)
variables = learner.new_members(jax.random.key(0), 1)
variables, opt_state = learner.trainer.place(variables, learner.init_optimizer(variables))
n = 4 * config.train.batch_size
temporaries = {{}}
for split in (False, True):
  with sharding.activations(mesh) if split else contextlib.nullcontext():
    compiled = learner.trainer._epochs[False].lower(
        variables, opt_state, learner.data.train_images, learner.data.train_labels,
        jnp.zeros((1, n), jnp.int32), jnp.ones((1, n), jnp.float32), n,
        jax.random.split(jax.random.key(1), 1), 0, None).compile()
  temporaries[split] = compiled.memory_analysis().temp_size_in_bytes
print(json.dumps(temporaries))
'''


def test_activations_split_over_the_batch_keep_a_sharded_step_small():
  """With sharded parameters, the transformer's activations must be split over the batch
  (`sharding.activations`, where the steps trace): left to itself, XLA:CPU splits them the way
  the parameters are split and keeps every device's whole batch (measured: 4x the
  temporaries)."""
  script = LM_MEMORY.format(config=os.path.join(REPO, 'configs', 'lm.py:tiny'))
  out = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=devices_env(8),
                       capture_output=True, text=True, timeout=300, check=True)
  temporaries = json.loads(out.stdout.strip().splitlines()[-1])
  assert temporaries['true'] < 0.5 * temporaries['false']


def test_members_split_over_devices_match_one_device_and_restore_on_one(idx_dir, tmp_path):
  """4 members x 2 data devices; the 8-device checkpoint then restores here, on 1 device."""
  one = run_with_devices(1, idx_dir, tmp_path / 'one', learner='k_ensemble')
  eight = run_with_devices(8, idx_dir, tmp_path / 'eight', learner='k_ensemble', member=4)
  assert_same_run(one, eight)

  assert jax.device_count() == 1
  written = analyze.Run(str(tmp_path / 'eight'))
  assert written.learner.num_members(written.predictor(3)) == 4
  assert abs(written.evaluate(3)['error'] - eight['errors'][-1]) <= 2 / 400


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_processes(idx_dir, workdir, **kwargs):
  coordinator = f'127.0.0.1:{free_port()}'
  return [subprocess.Popen(command(idx_dir, workdir, coordinator=coordinator, processes=2,
                                   process=i, **kwargs),
                           cwd=REPO, env=devices_env(2), stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
          for i in range(2)]


def test_two_processes_match_one_and_resume_after_both_are_killed(idx_dir, tmp_path):
  one = run_with_devices(1, idx_dir, tmp_path / 'one')
  workdir = tmp_path / 'two'
  processes = start_processes(idx_dir, workdir)
  deadline = time.time() + 240
  while time.time() < deadline:  # kill both once the first arrival is checkpointed
    done = [s for s in os.listdir(workdir / 'checkpoints') if s.isdigit()] if os.path.isdir(
        workdir / 'checkpoints') else []
    if done:
      break
    time.sleep(0.05)
  for p in processes:
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert max(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit()) < 3

  processes = start_processes(idx_dir, workdir)
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  assert all(p.returncode == 0 for p in processes)
  two = json.loads(outputs[0].strip().splitlines()[-1])
  assert two['devices'] == 4
  assert f'Resuming {workdir} after arrival' in outputs[0]
  assert 'Resuming' not in outputs[1]  # only process 0 writes the console
  assert_same_run(one, two)


def test_two_processes_streaming_their_halves_of_each_batch_match_one(idx_dir, tmp_path):
  """A pod's setting: data on the hosts, parameters sharded (FSDP), 2 processes of 2 devices,
  the data axis across both (each process reading only its devices' rows of every batch and
  block, holding only its shards), give the one-device run; the checkpoint both processes
  wrote evaluates here, on one device, as logged."""
  one = run_with_devices(1, idx_dir, tmp_path / 'one', learner='k_ensemble')
  processes = start_processes(idx_dir, tmp_path / 'two', learner='k_ensemble',
                              placement='host', shard_params=True)
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  assert all(p.returncode == 0 for p in processes)
  two = json.loads(outputs[0].strip().splitlines()[-1])
  assert two['devices'] == 4
  assert_same_run(one, two)
  written = analyze.Run(str(tmp_path / 'two'))
  assert written.evaluate(3)['loss'] == pytest.approx(two['losses'][-1], rel=1e-5)


def test_processes_that_disagree_on_the_stream_stop_with_a_clear_error(idx_dir, tmp_path):
  coordinator = f'127.0.0.1:{free_port()}'
  processes = [subprocess.Popen(command(idx_dir, tmp_path / 'run', learner=learner,
                                        coordinator=coordinator, processes=2, process=i),
                                cwd=REPO, env=devices_env(2), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
               for i, learner in enumerate(['finetune', 'k_ensemble'])]
  errors = [p.communicate(timeout=300)[1] for p in processes]
  assert all(p.returncode != 0 for p in processes)
  assert all('processes disagree on the config, the stream and the data' in e for e in errors)
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_a_checkpoint_damaged_on_one_host_only_is_passed_over_by_every_process(idx_dir,
                                                                               tmp_path):
  """Process 1's shards of the newest checkpoint are garbage: its restore fails while process
  0's succeeds, and both fall back to the checkpoint before (they used to wait for each other
  in different collectives, for ever)."""
  workdir = tmp_path / 'two'
  processes = start_processes(idx_dir, workdir, shard_params=True)
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  assert all(p.returncode == 0 for p in processes)
  uninterrupted = json.loads(outputs[0].strip().splitlines()[-1])
  shards = workdir / 'checkpoints' / '3' / 'default' / 'ocdbt.process_1' / 'd'
  assert os.listdir(shards)
  for name in os.listdir(shards):
    (shards / name).write_bytes(b'garbage')

  processes = start_processes(idx_dir, workdir, shard_params=True)
  try:
    outputs = [p.communicate(timeout=120)[0] for p in processes]
  finally:
    for p in processes:
      p.kill()
  assert all(p.returncode == 0 for p in processes)
  assert 'WARNING: checkpoint 3 is corrupt' in outputs[0]
  assert os.listdir(workdir / 'checkpoints_corrupt') == ['3']
  assert json.loads(outputs[0].strip().splitlines()[-1]) == uninterrupted


CANNOT_MOVE_ASIDE = '''
from alma_jax import checkpoint
def cannot(self, step):
  raise PermissionError(13, 'Permission denied (injected)', str(step))
checkpoint.Checkpointer._move_aside = cannot
'''


def test_a_corrupt_checkpoint_process_0_cannot_move_aside_stops_every_process(idx_dir,
                                                                               tmp_path):
  """Process 0 moves a corrupt checkpoint aside for all; where it cannot (permissions, a copy
  to another file system that meets the damaged files), process 1 stops too, instead of
  waiting for it at the next collective for ever."""
  workdir = tmp_path / 'two'
  processes = start_processes(idx_dir, workdir)
  for p in processes:
    p.communicate(timeout=300)
  assert all(p.returncode == 0 for p in processes)
  for path in checkpoint_data_files(workdir / 'checkpoints' / '3'):
    with open(path, 'wb') as f:
      f.write(b'garbage')
  coordinator = f'127.0.0.1:{free_port()}'
  errors = errors_of_failed_processes([
      command(idx_dir, workdir, coordinator=coordinator, processes=2, process=i,
              prelude=CANNOT_MOVE_ASIDE if i == 0 else '') for i in range(2)])
  assert 'Permission denied (injected)' in errors[0]
  assert 'moving the corrupt checkpoint 3 aside failed on another process' in errors[1]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2', '3']


def errors_of_failed_processes(commands: list[list[str]]) -> list[str]:
  """The standard errors of the processes of `commands`, run together (2 devices each), once
  all have failed: within 60 s, not hanging at a collective."""
  processes = [subprocess.Popen(c, cwd=REPO, env=devices_env(2), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for c in commands]
  try:
    errors = [p.communicate(timeout=60)[1] for p in processes]
  finally:
    for p in processes:
      p.kill()
  assert all(p.returncode != 0 for p in processes)
  return errors


def test_processes_that_do_not_share_the_workdir_stop_before_any_work(idx_dir, tmp_path):
  """Process 1 is given a workdir of its own (a host-local path, say): it would write its
  shards of every checkpoint where process 0 never looks."""
  coordinator = f'127.0.0.1:{free_port()}'
  prelude = 'from alma_jax import workdir\nworkdir.SHARED_WAIT_SECONDS = 1'
  errors = errors_of_failed_processes([
      command(idx_dir, tmp_path / f'run{i}', coordinator=coordinator, processes=2, process=i,
              prelude=prelude) for i in range(2)])
  assert 'process 1 does not see the lock file' in errors[1]
  assert 'failed on another process' in errors[0]
  assert 'every process must see one workdir' in errors[1]
  assert not os.path.exists(tmp_path / 'run0' / 'checkpoints')
  assert not os.path.exists(tmp_path / 'run0' / workdirs.LOCK_FILE)


FULL_DISK = '''
from alma_jax import workdir
def full(path, text):
  raise OSError(28, 'No space left on device (injected)', path)
workdir.write_atomic = full
'''


@pytest.mark.parametrize('failing, data, prelude', [
    (1, 'missing', ''),      # process 1's data path does not exist
    (0, '', FULL_DISK)],     # process 0 cannot write the config into the workdir
    ids=['data', 'config'])
def test_a_process_that_fails_alone_stops_the_others_too(idx_dir, tmp_path, failing, data,
                                                         prelude):
  """The failing process stops naming its error; the other stops too, instead of waiting for
  it at the next collective."""
  coordinator = f'127.0.0.1:{free_port()}'
  errors = errors_of_failed_processes([
      command(str(tmp_path / data) if i == failing and data else idx_dir, tmp_path / 'run',
              coordinator=coordinator, processes=2, process=i, placement='auto',
              prelude=prelude if i == failing else '') for i in range(2)])
  assert 'failed on another process' in errors[1 - failing]
  assert (data or 'injected') in errors[failing]


def test_a_multi_process_mesh_uses_every_device(monkeypatch):
  """A process whose devices are all left out of the mesh owns no shard of anything: it failed
  deep into the run, alone, while the others waited for it."""
  monkeypatch.setattr(jax, 'device_count', lambda: 16)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(ValueError, match=r'config\.mesh\.data=8 x config\.mesh\.member=1: a run '
                                       r'of 2 processes uses all their 16 devices'):
    sharding.make_mesh(data=8)
