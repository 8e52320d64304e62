"""Data and member parallelism over fake CPU devices, two processes, and topology changes.

Runs on N devices are compared with runs on 1: gradients and test sums are added in another
order over shards, so losses agree to float32 rounding (relative 1e-4) and errors to within two
of the 400 test examples.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
from alma_jax import analyze
from conftest import REPO

SCRIPT = '''
import json, sys
sys.path.insert(0, {tests!r})
import jax
if {coordinator!r}:
  jax.distributed.initialize({coordinator!r}, {processes}, {process})
from conftest import tiny_config
from alma_jax import run
config = tiny_config({data!r})
config.stream.num_megabatches = 3
config.train.update(max_epochs=3, patience=3)
config.learner.update(name={learner!r}, num_members=4)
config.mesh.member = {member}
summary = run.run(config, {workdir!r})
if jax.process_index() == 0:
  rows = [json.loads(l) for l in open({workdir!r} + '/metrics.jsonl')]
  print(json.dumps({{'devices': jax.device_count(), 'losses': [r['test_loss'] for r in rows],
                    'errors': [r['test_error'] for r in rows]}}))
'''


def command(idx_dir, workdir, learner='finetune', member=1, coordinator='', processes=1,
            process=0):
  script = SCRIPT.format(tests=os.path.join(REPO, 'tests'), data=idx_dir, workdir=str(workdir),
                         learner=learner, member=member, coordinator=coordinator,
                         processes=processes, process=process)
  return [sys.executable, '-c', script]


def env(devices):
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def run_with_devices(n, idx_dir, workdir, **kwargs):
  out = subprocess.run(command(idx_dir, workdir, **kwargs), cwd=REPO, env=env(n),
                       capture_output=True, text=True, timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def assert_same_run(a, b):
  for x, y in zip(a['losses'], b['losses'], strict=True):
    assert abs(x - y) <= 1e-4 * max(1.0, abs(x))
  for x, y in zip(a['errors'], b['errors'], strict=True):
    assert abs(x - y) <= 2 / 400


def test_eight_devices_of_data_parallelism_match_one(idx_dir, tmp_path):
  one = run_with_devices(1, idx_dir, tmp_path / 'one')
  eight = run_with_devices(8, idx_dir, tmp_path / 'eight')
  assert one['devices'] == 1 and eight['devices'] == 8
  assert_same_run(one, eight)


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


def start_processes(idx_dir, workdir):
  coordinator = f'127.0.0.1:{free_port()}'
  return [subprocess.Popen(command(idx_dir, workdir, coordinator=coordinator, processes=2,
                                   process=i),
                           cwd=REPO, env=env(2), stdout=subprocess.PIPE,
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


def test_processes_that_disagree_on_the_stream_stop_with_a_clear_error(idx_dir, tmp_path):
  coordinator = f'127.0.0.1:{free_port()}'
  processes = [subprocess.Popen(command(idx_dir, tmp_path / 'run', learner=learner,
                                        coordinator=coordinator, processes=2, process=i),
                                cwd=REPO, env=env(2), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
               for i, learner in enumerate(['finetune', 'k_ensemble'])]
  errors = [p.communicate(timeout=300)[1] for p in processes]
  assert all(p.returncode != 0 for p in processes)
  assert all('processes disagree on the config, the stream and the data' in e for e in errors)
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')
