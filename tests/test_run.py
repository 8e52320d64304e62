"""End-to-end runs of the driver on the synthetic data set: protocol, resume, bad workdirs."""
import gc
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from alma_jax import checkpoint, data, metrics, run, stream as alma_stream, workdir as workdirs
from conftest import (REPO, checkpoint_data_files, flip_a_bit, kill_during_round,
                      make_idx_dataset)


def errors(workdir):
  with open(os.path.join(workdir, run.METRICS_FILE)) as f:
    return [json.loads(line)['test_error'] for line in f]


def test_tiny_run_end_to_end(config, tmp_path):
  config.stream.waiting_time = 2
  config.stream.train_on_last = True
  summary = run.run(config, str(tmp_path))
  with open(tmp_path / run.METRICS_FILE) as f:
    rows = [json.loads(line) for line in f]
  assert [r['trained'] for r in rows] == [False, True, False, True, True]
  assert rows[0]['test_error'] > 0.7  # the untrained predictor is evaluated too: near chance
  assert rows[0]['train_flops'] == 0 and rows[1]['train_flops'] > 0
  assert rows[-1]['test_error'] < 0.5
  assert summary['cer'] == pytest.approx(sum(r['test_error'] for r in rows))
  params = 144 * 16 + 16 + 16 * 16 + 16 + 170
  assert summary['rounds'] == 3 and summary['params'] == params
  # Memory: the examples waiting for their round (12x12 bytes and an int32 label each), and
  # Adadelta's two float32 accumulators per parameter (and its step counts) while training.
  dataset = data.load(config.data)
  stream = alma_stream.make_stream(len(dataset.train_labels), 5, config.stream.permutation_seed,
                                   config.stream.validation_fraction)
  arrived = [len(a) + len(b) for a, b in zip(stream.train, stream.valid)]
  waiting = [arrived[0], 0, arrived[2], 0, 0]
  assert [r['buffer_bytes'] for r in rows] == [n * (144 + 4) for n in waiting]
  assert [r['optimizer_bytes'] == 0 for r in rows] == [not r['trained'] for r in rows]
  assert all(8 * params <= r['optimizer_bytes'] <= 8 * params + 64 for r in rows if r['trained'])
  assert summary['max_buffer_bytes'] == max(r['buffer_bytes'] for r in rows)
  assert os.path.exists(tmp_path / run.SUMMARY_FILE)
  assert sorted(os.listdir(tmp_path / 'checkpoints'))[-1] == '5'


def test_finished_run_is_not_recomputed(config, tmp_path, capsys):
  first = run.run(config, str(tmp_path))
  mtime = os.path.getmtime(tmp_path / 'checkpoints' / '5')
  again = run.run(config, str(tmp_path))
  assert again == first  # its summary too, start-up and compilation included
  assert os.path.getmtime(tmp_path / 'checkpoints' / '5') == mtime
  assert 'is finished: its 5 arrivals are done' in capsys.readouterr().out
  older = {k: v for k, v in first.items() if k != 'cumulative_loss_per_t'}  # an earlier version's
  (tmp_path / run.SUMMARY_FILE).write_text(json.dumps(older))
  assert run.run(config, str(tmp_path)) == first


def test_resume_with_a_different_protocol_is_refused(config, tmp_path):
  run.run(config, str(tmp_path))
  config.stream.waiting_time = 2
  with pytest.raises(run.WorkdirError, match='stream.waiting_time'):
    run.run(config, str(tmp_path))
  config.seed, config.model.hidden, config.train.batch_size = 5, 8, 32
  config.optimizer.learning_rate, config.stream.permutation_seed = 0.5, 3
  with pytest.raises(run.WorkdirError, match=r'\) and 1 more\. Use a new --workdir'):
    run.run(config, str(tmp_path))


def test_a_run_written_before_a_config_key_existed_resumes(config, tmp_path):
  """Keys added since (here train.microbatches and the backend section) at their defaults
  are no protocol change."""
  config.stream.num_megabatches = 2
  first = run.run(config, str(tmp_path))
  path = tmp_path / run.CONFIG_FILE
  saved = json.loads(path.read_text())
  del saved['train']['microbatches'], saved['backend']
  path.write_text(json.dumps(saved))
  assert run.run(config, str(tmp_path))['cer'] == first['cer']
  config.train.microbatches = 2
  with pytest.raises(run.WorkdirError, match='train.microbatches'):
    run.run(config, str(tmp_path))


def no_data_loaded(monkeypatch):
  """Makes loading a data set fail: a refusal that needs no data must come before it."""
  def load(_):
    raise AssertionError('the data set was loaded before a refusal that needs none')
  monkeypatch.setattr(run.data, 'load', load)


@pytest.mark.parametrize('learner', ['gens', 'finetune'])
def test_a_run_saved_keeping_its_optimizer_resumes_where_that_changed_nothing(config, tmp_path,
                                                                             learner):
  """0.7 accepted learner.reset_optimizer=False for learners that train new members every
  round, where it changed nothing: such a run resumes with the reset that 0.8 requires. For a
  learner that does keep its optimizer, the setting is part of the protocol."""
  config.learner.name = learner
  config.stream.num_megabatches = 2
  first = run.run(config, str(tmp_path))
  path = tmp_path / run.CONFIG_FILE
  saved = json.loads(path.read_text())
  saved['learner']['reset_optimizer'] = False
  path.write_text(json.dumps(saved))
  if learner == 'gens':
    assert run.run(config, str(tmp_path))['cer'] == first['cer']
  else:
    with pytest.raises(run.WorkdirError, match='learner.reset_optimizer'):
      run.run(config, str(tmp_path))


def test_checkpoints_beyond_the_stream_are_refused(config, tmp_path, monkeypatch):
  config.stream.num_megabatches = 2
  run.run(config, str(tmp_path))
  shutil.copytree(tmp_path / 'checkpoints' / '2', tmp_path / 'checkpoints' / '9')
  no_data_loaded(monkeypatch)
  with pytest.raises(run.WorkdirError, match=r'checkpoints \[9\] but this run has only 2'):
    run.run(config, str(tmp_path))


def test_results_whose_checkpoints_were_lost_are_not_overwritten(config, tmp_path, monkeypatch):
  config.stream.num_megabatches = 3
  run.run(config, str(tmp_path))
  kept = (tmp_path / run.METRICS_FILE).read_text()
  shutil.rmtree(tmp_path / 'checkpoints')
  no_data_loaded(monkeypatch)
  with pytest.raises(run.WorkdirError, match='results of 3 arrivals'):
    run.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')  # refused before anything was created
  (tmp_path / 'checkpoints').write_text('x')
  with pytest.raises(FileExistsError, match='is a file, not a checkpoint directory'):
    run.run(config, str(tmp_path))
  assert (tmp_path / run.METRICS_FILE).read_text() == kept


def _run_patched(config, tmp_path, patch: str, command_line: bool = False):
  """`config` run in workdir tmp_path/w by a fresh process after Python code `patch`: by
  `run.run`, or (`command_line`) by `alma-jax` as a user runs it."""
  config_file = tmp_path / 'config.py'
  write_config(config, config_file)
  argv = ['alma-jax', f'--config={config_file}', f'--workdir={tmp_path / "w"}']
  code = patch + (
      f'import sys; sys.argv = {argv!r}\nfrom alma_jax import main; main.cli()\n' if command_line else
      'from alma_jax import config, run\n'
      f'run.run(config.load({str(config_file)!r}), {str(tmp_path / "w")!r})\n')
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                        text=True, timeout=120)


def test_a_failing_run_closes_its_checkpoints_and_exits(config, tmp_path):
  """An error after checkpoints were written (here: in the second arrival's evaluation) ends
  the process with the error, its checkpoint writes finished and their threads stopped."""
  result = _run_patched(config, tmp_path, (
      'from alma_jax.learners import members\n'
      'evaluate = members.MemberLearner.evaluate; calls = []\n'
      'def failing(self, state, *a):\n'
      '  calls.append(1)\n'
      '  if len(calls) == 2: raise RuntimeError("injected failure")\n'
      '  return evaluate(self, state, *a)\n'
      'members.MemberLearner.evaluate = failing\n'))
  assert result.returncode != 0 and 'injected failure' in result.stderr
  assert sorted(os.listdir(tmp_path / 'w' / 'checkpoints')) == ['1']


def test_a_workdir_in_use_is_refused_and_a_stale_lock_taken_over(config, tmp_path):
  config.stream.num_megabatches = 2
  workdirs.prepare(config, str(tmp_path))
  lock = tmp_path / run.LOCK_FILE
  alive = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  lock.write_text(json.dumps({'host': socket.gethostname(), 'pid': alive.pid,
                              'started': 'earlier'}))
  with pytest.raises(run.WorkdirError, match=f'in use by another run .*PID {alive.pid}'):
    run.run(config, str(tmp_path))
  alive.kill()
  alive.wait()
  assert not os.path.exists(tmp_path / run.METRICS_FILE)
  # Another start that took the stale lock over first keeps it: taking away a lock file that
  # is not the one judged stale puts it back.
  judged = workdirs._identity(str(lock))
  lock.write_text(json.dumps({'host': 'another', 'pid': 1}))
  os.utime(lock, ns=(1, 1))
  assert not workdirs._take_away(str(lock), judged)
  assert json.loads(lock.read_text()) == {'host': 'another', 'pid': 1}
  assert sorted(os.listdir(tmp_path)) == sorted([run.LOCK_FILE, run.CONFIG_FILE])
  # A lock holding this process's PID was left by an earlier process of that PID (a restarted
  # container's entry point): stale.
  holder = {'host': socket.gethostname(), 'pid': os.getpid()}
  lock.write_text(json.dumps(holder))  # (in another PID namespace, it may be alive)
  with pytest.raises(run.WorkdirError, match='in use by another run'):
    run.run(config, str(tmp_path))
  lock.write_text(json.dumps({**holder, 'pids': workdirs._pid_namespace()}))
  assert run.run(config, str(tmp_path))['arrivals'] == 2
  shutil.rmtree(tmp_path / 'checkpoints')
  for name in (run.METRICS_FILE, run.SUMMARY_FILE):
    os.remove(tmp_path / name)
  gone = subprocess.Popen([sys.executable, '-c', 'pass'])
  gone.wait()  # a process that held the lock and was killed
  lock.write_text(json.dumps({'host': socket.gethostname(), 'pid': gone.pid}))
  assert run.run(config, str(tmp_path))['arrivals'] == 2
  assert not lock.exists()  # released at the end
  # Killed between creating the lock and writing its name: empty, refused while it may still
  # be being written, taken over once it is older than that.
  lock.write_text('')
  with pytest.raises(run.WorkdirError, match='in use by another run'):
    run.run(config, str(tmp_path))
  written = time.time() - workdirs.UNWRITTEN_LOCK_SECONDS - 1
  os.utime(lock, (written, written))
  assert run.run(config, str(tmp_path))['arrivals'] == 2
  assert not lock.exists()


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_preemption_notice_stops_cleanly_and_the_run_resumes(config, tmp_path, signum):
  config.stream.num_megabatches = 4
  config.train.update(max_epochs=30, patience=30)
  config_file = tmp_path / 'config.py'
  write_config(config, config_file)
  command = [sys.executable, '-m', 'alma_jax.main', f'--config={config_file}',
             f'--workdir={tmp_path / "w"}']
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  for line in process.stdout:
    if line.split()[:1] == ['1']:
      process.send_signal(signum)
      break
  out, err = process.communicate(timeout=120)
  assert process.returncode == 128 + signum
  assert f'{signal.Signals(signum).name}: interrupted after arrival' in out
  assert 'Traceback' not in err
  assert not os.path.exists(tmp_path / 'w' / run.LOCK_FILE)
  assert all(name.isdigit() for name in os.listdir(tmp_path / 'w' / 'checkpoints'))
  resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0 and 'Resuming' in resumed.stdout
  assert len(errors(tmp_path / 'w')) == 4


def test_a_start_that_got_no_results_does_not_claim_the_workdir(config, tmp_path):
  good_path = config.data.path
  config.data.path = str(tmp_path / 'typo')
  with pytest.raises(FileNotFoundError):
    run.run(config, str(tmp_path / 'w'))
  config.data.path = good_path
  config.stream.num_megabatches = 2
  assert run.run(config, str(tmp_path / 'w'))['arrivals'] == 2
  (tmp_path / 'v').mkdir()
  (tmp_path / 'v' / (run.CONFIG_FILE + '.tmp-0123abcd')).write_text('{"half": ')  # killed
  assert run.run(config, str(tmp_path / 'v'))['arrivals'] == 2
  assert not os.path.exists(tmp_path / 'v' / (run.CONFIG_FILE + '.tmp-0123abcd'))
  # What killed writes leave is removed when the run is taken up again; nothing else is.
  (tmp_path / 'w' / (run.METRICS_FILE + '.tmp-0123abcd')).write_text('{"t": ')
  (tmp_path / 'w' / 'notes.tmp-0123abcd').write_text('mine')
  run.run(config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w' / (run.METRICS_FILE + '.tmp-0123abcd'))
  assert (tmp_path / 'w' / 'notes.tmp-0123abcd').read_text() == 'mine'


@pytest.mark.parametrize('damage,message', [
    (lambda w: (w / run.CONFIG_FILE).write_text('{"seed": '), 'is not a readable run config'),
    (lambda w: (w / run.CONFIG_FILE).unlink(), r'no config.json \(deleted\?\)'),
])
def test_a_damaged_workdir_is_named(config, tmp_path, damage, message):
  config.stream.num_megabatches = 2
  run.run(config, str(tmp_path))
  damage(tmp_path)
  with pytest.raises(run.WorkdirError, match=message):
    run.run(config, str(tmp_path))
  (tmp_path / 'file').write_text('x')
  with pytest.raises(run.WorkdirError, match='is a file, not a directory'):
    run.run(config, str(tmp_path / 'file'))


def test_a_resume_on_changed_data_is_refused(config, tmp_path):
  data_dir = tmp_path / 'data'
  shutil.copytree(config.data.path, data_dir)
  config.data.path = str(data_dir)
  config.stream.num_megabatches = 3
  run.run(config, str(tmp_path / 'w'))
  shutil.rmtree(tmp_path / 'w' / 'checkpoints' / '3')
  make_idx_dataset(str(data_dir), seed=1)  # other images and labels at the same path
  with pytest.raises(run.WorkdirError, match='train_images, train_labels, test_images'):
    run.run(config, str(tmp_path / 'w'))


def test_outputs_are_rebuilt_from_the_checkpointed_history(config, tmp_path):
  config.stream.num_megabatches = 3
  config.log.tensorboard = True
  run.run(config, str(tmp_path))
  kept = (tmp_path / run.METRICS_FILE).read_text()
  (tmp_path / run.METRICS_FILE).write_text('damaged')
  shutil.rmtree(tmp_path / 'checkpoints' / '3')  # as if killed before its last checkpoint
  run.run(config, str(tmp_path))
  rebuilt = (tmp_path / run.METRICS_FILE).read_text().splitlines()
  assert rebuilt[:2] == kept.splitlines()[:2]  # arrival 3 ran again (its seconds differ)
  assert [json.loads(r)['test_error'] for r in rebuilt] == [
      json.loads(r)['test_error'] for r in kept.splitlines()]
  events = os.listdir(tmp_path / 'tensorboard')
  assert len(events) == 1
  assert _scalar_steps(tmp_path / 'tensorboard' / events[0], 'test_error') == [1, 2, 3]


def _scalar_steps(path, tag: str) -> list[int]:
  """The steps of scalar `tag` in a TensorBoard events file (TFRecords of Event protos)."""
  from tensorboardX.proto import event_pb2
  data, steps, i = path.read_bytes(), [], 0
  while i < len(data):
    length = struct.unpack('<Q', data[i:i + 8])[0]
    event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
    steps += [event.step for value in event.summary.value if value.tag == tag]
    i += 12 + length + 4
  return steps


def test_a_checkpoint_write_that_fails_ends_the_process(config, tmp_path):
  """The workdir's checkpoints become a file mid-run: the write of arrival 2 fails, and the
  command exits with the error instead of waiting (20 minutes) on Orbax's threads."""
  result = _run_patched(config, tmp_path, (
      'import shutil; from alma_jax import checkpoint\n'
      'save = checkpoint.Checkpointer.save\n'
      'def sabotaged(self, step, tree):\n'
      '  if step == 2:\n'
      '    self.manager.wait_until_finished()\n'  # (else arrival 1's write races the removal)
      '    shutil.rmtree(self.directory); open(self.directory, "w").write("x")\n'
      '    print("sabotaged arrival 2", flush=True)\n'
      '  return save(self, step, tree)\n'
      'checkpoint.Checkpointer.save = sabotaged\n'), command_line=True)
  assert 'sabotaged arrival 2' in result.stdout  # (not a failure of the patch itself)
  assert result.returncode != 0 and f'{tmp_path / "w" / "checkpoints"}' in result.stderr
  assert os.path.isfile(tmp_path / 'w' / 'checkpoints')  # nothing wrote past the failure


def test_a_progress_bar_shows_while_rounds_train_unless_the_output_is_not_a_terminal(
    config, tmp_path, capsys):
  config.stream.num_megabatches = 2
  config.log.progress = 'on'
  run.run(config, str(tmp_path / 'on'))
  shown = capsys.readouterr().err
  assert 'round' in shown and 'examples/s' in shown and 'validation accuracy' in shown
  config.log.progress = 'auto'  # pytest's stderr is not a terminal
  run.run(config, str(tmp_path / 'auto'))
  assert 'examples/s' not in capsys.readouterr().err


def test_a_foreign_workdir_is_refused(config, tmp_path):
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(run.WorkdirError, match='not empty'):
    run.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == ['notes.txt']


def test_a_diverging_run_stops_with_a_clear_error(config, tmp_path):
  config.optimizer.update(name='sgd', learning_rate=1e6, momentum=0.9)
  with pytest.raises(FloatingPointError, match=r'after arrival 1: training diverged .*; no '
                     r'checkpoint was written'):
    run.run(config, str(tmp_path))


def test_from_scratch_and_replay_run(config, tmp_path):
  config.learner.name = 'from_scratch'
  config.stream.replay = 'all'
  summary = run.run(config, str(tmp_path))
  assert summary['rounds'] == 5 and summary['final_error'] < 0.5


def test_corrupt_latest_checkpoint_falls_back_and_is_kept(config, tmp_path):
  reference = run.run(config, str(tmp_path / 'a'))
  workdir = tmp_path / 'b'
  run.run(config, str(workdir))
  latest = workdir / 'checkpoints' / '5'
  for root, _, files in os.walk(latest):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  summary = run.run(config, str(workdir))
  assert summary['cer'] == pytest.approx(reference['cer'], abs=1e-7)
  assert os.listdir(workdir / 'checkpoints_corrupt') == ['5']  # moved aside, not deleted
  assert errors(workdir) == errors(tmp_path / 'a')


def test_a_flipped_bit_is_found_and_the_checkpoint_before_used(config, tmp_path):
  reference = run.run(config, str(tmp_path / 'a'))
  workdir = tmp_path / 'b'
  run.run(config, str(workdir))
  flip_a_bit(checkpoint_data_files(workdir / 'checkpoints' / '5')[0])
  summary = run.run(config, str(workdir))
  assert os.listdir(workdir / 'checkpoints_corrupt') == ['5']
  assert summary['cer'] == pytest.approx(reference['cer'], abs=1e-7)
  assert errors(workdir) == errors(tmp_path / 'a')


def test_each_part_of_the_run_state_is_read_and_checked_alone(config, tmp_path, monkeypatch):
  config.stream.num_megabatches = 2
  run.run(config, str(tmp_path))
  directory = str(tmp_path / 'checkpoints')
  with checkpoint.Checkpointer(directory) as checkpointer:
    whole = checkpointer.restore(2)
    part = checkpointer.restore(2, ('history',))
    assert list(part) == ['history'] and sorted(whole) == ['history', 'learner', 'stream']
    for name, values in whole['history'].items():
      np.testing.assert_array_equal(part['history'][name], values)
    with pytest.raises(LookupError, match=r"holds no \['histories'\]"):
      checkpointer.restore(2, ('histories',))
    # A step whose history does not match its own checksum: its learner alone still reads.
    wrong = lambda tree: checkpoint_sum(tree) + (tree is whole['history'])
    checkpoint_sum = checkpoint.checksum
    monkeypatch.setattr(checkpoint, 'checksum', wrong)
    checkpointer.save(3, whole)
    checkpointer.manager.wait_until_finished()
    monkeypatch.setattr(checkpoint, 'checksum', checkpoint_sum)
    assert sorted(checkpointer.restore(3, ('learner', 'stream'))) == ['learner', 'stream']
    for parts in (None, ('history',)):
      with pytest.raises(checkpoint.CorruptCheckpointError, match='its history does not match'):
        checkpointer.restore(3, parts)
    # A checkpoint of 0.9.5 and before, with one checksum of the whole tree: read whole to
    # check it, whatever part is asked for.
    for step, offset in ((4, 0), (5, 1)):
      checkpointer.manager.save(step, args=ocp.args.StandardSave({
          **whole, checkpoint.CHECKSUM: np.asarray(checkpoint.checksum(whole) + offset,
                                                   np.int64)}))
      checkpointer.manager.wait_until_finished()
    assert list(checkpointer.restore(4, ('history',))) == ['history']
    with pytest.raises(checkpoint.CorruptCheckpointError, match='history, learner, stream'):
      checkpointer.restore(5, ('history',))


def test_a_truncated_data_file_is_corruption(config, tmp_path):
  """Orbax wraps a failed read of an array in a bare Exception; what it wraps decides."""
  config.stream.num_megabatches = 2
  run.run(config, str(tmp_path))
  with open(checkpoint_data_files(tmp_path / 'checkpoints' / '2')[0], 'r+b') as f:
    f.truncate(7)
  with checkpoint.Checkpointer(str(tmp_path / 'checkpoints')) as checkpointer:
    with pytest.raises(Exception, match='Encountered error while reading') as raised:
      checkpointer.restore(2)
    assert checkpoint.is_corruption(raised.value)
    assert checkpointer.restore_latest()[0] == 1
  assert os.listdir(tmp_path / 'checkpoints_corrupt') == ['2']


def test_a_failed_read_leaves_no_traceback_for_later(config, tmp_path, monkeypatch):
  """Orbax's read of the damaged array, left unfinished, raises when the garbage collector
  closes it: in a notebook a traceback on stderr whenever that happens, for every failed read."""
  config.stream.num_megabatches = 2
  run.run(config, str(tmp_path))
  with open(checkpoint_data_files(tmp_path / 'checkpoints' / '2')[0], 'r+b') as f:
    f.truncate(7)
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', reported.append)
  with checkpoint.Checkpointer(str(tmp_path / 'checkpoints')) as checkpointer:
    for _ in range(3):
      try:
        checkpointer.restore(2)
      except Exception as error:  # (the error, its traceback and the read, dropped)
        assert checkpoint.is_corruption(error)
  gc.collect()
  assert [(u.exc_type, u.exc_value, u.object) for u in reported] == []


@pytest.mark.parametrize('theirs', ['{"lr": 0.1}', '[1, 2]', '"hello"'])
def test_a_workdir_holding_another_config_json_is_not_written_into(config, tmp_path, theirs):
  """A folder with a config.json of its own and no results looked like a start of ours that
  failed: the run overwrote the file and wrote beside the user's."""
  workdir = tmp_path / 'theirs'
  (workdir / 'checkpoints').mkdir(parents=True)
  (workdir / 'config.json').write_text(theirs)
  (workdir / 'checkpoints' / 'model.pt').write_text('weights')
  with pytest.raises(run.WorkdirError, match="is not an alma_jax run's config"):
    run.run(config, str(workdir))
  assert (workdir / 'config.json').read_text() == theirs
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'config.json']
  assert os.listdir(workdir / 'checkpoints') == ['model.pt']


def test_a_workdir_below_a_file_is_refused_naming_the_file(config, tmp_path):
  (tmp_path / 'notes').write_text('mine')
  with pytest.raises(run.WorkdirError, match=r"notes' is a file, not a directory"):
    run.run(config, str(tmp_path / 'notes' / 'run'))
  assert (tmp_path / 'notes').read_text() == 'mine'


def test_the_failed_read_filter_passes_every_other_report_on(monkeypatch):
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', reported.append)
  checkpoint._drop_failed_read_reports()

  def report(error, where):
    try:
      raise error
    except Exception as raised:
      sys.unraisablehook(types.SimpleNamespace(  # (what CPython passes, field by field)
          exc_type=type(raised), exc_value=raised, exc_traceback=raised.__traceback__,
          err_msg=None, object=where))
  report(RuntimeError('Event loop is closed'), object())  # a transport's __del__, say
  report(ValueError('elsewhere'), None)
  assert [str(u.exc_value) for u in reported] == ['Event loop is closed', 'elsewhere']


def test_files_the_system_fails_to_read_are_not_corruption(config, tmp_path):
  """An error of the operating system while reading (here ELOOP; on a network file system EIO,
  which tensorstore reports as UNKNOWN) says nothing of the files: the run stops, and nothing
  is moved aside."""
  config.stream.num_megabatches = 2
  run.run(config, str(tmp_path))
  for path in checkpoint_data_files(tmp_path / 'checkpoints' / '2'):
    os.remove(path)
    os.symlink(path, path)
  with pytest.raises(Exception) as raised:
    run.run(config, str(tmp_path))
  assert not checkpoint.is_corruption(raised.value)
  cause = raised.value.__cause__ or raised.value
  assert "os_error_code='40'" in str(cause), str(cause)[:300]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
  assert not os.path.exists(tmp_path / 'checkpoints_corrupt')


@pytest.mark.parametrize('failure', [
    MemoryError('injected'),
    # tensorstore's ValueErrors of storage that cannot be read now, not of damaged files
    ValueError('PERMISSION_DENIED: Error opening file: Permission denied'),
    ValueError('UNAVAILABLE: gcs endpoint unreachable'),
    ValueError('UNKNOWN: Error reading local file "d/1f": Input/output error '
               "[os_error_code='5']")])
def test_a_failure_that_is_not_corruption_stops_the_run_and_moves_nothing(config, tmp_path,
                                                                          monkeypatch, failure):
  config.stream.num_megabatches = 2
  run.run(config, str(tmp_path))
  def fails(self, *args):
    raise failure
  monkeypatch.setattr(checkpoint.Checkpointer, '_read', fails)
  with pytest.raises(type(failure), match=re.escape(str(failure))):
    run.run(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
  assert not os.path.exists(tmp_path / 'checkpoints_corrupt')


def test_a_checkpoint_without_its_metadata_is_corrupt(config, tmp_path):
  config.stream.num_megabatches = 2
  run.run(config, str(tmp_path))
  os.remove(tmp_path / 'checkpoints' / '2' / 'default' / '_METADATA')
  with checkpoint.Checkpointer(str(tmp_path / 'checkpoints')) as checkpointer:
    with pytest.raises(checkpoint.CorruptCheckpointError, match='metadata is missing'):
      checkpointer.restore(2)
    assert checkpointer.restore_latest()[0] == 1
  assert os.listdir(tmp_path / 'checkpoints_corrupt') == ['2']


def test_a_run_whose_every_checkpoint_is_corrupt_says_where_they_are_kept(config, tmp_path,
                                                                         capsys):
  config.stream.num_megabatches = 2
  run.run(config, str(tmp_path))
  for step in ('1', '2'):
    for root, _, names in os.walk(tmp_path / 'checkpoints' / step):
      for name in names:
        (Path(root) / name).write_bytes(b'garbage')
  capsys.readouterr()
  with pytest.raises(run.WorkdirError, match=r'found corrupt \(kept in .*checkpoints_corrupt\)'):
    run.run(config, str(tmp_path))
  said = capsys.readouterr().out
  assert 'falling back to checkpoint 1.' in said and 'no checkpoint is left before it.' in said
  assert sorted(os.listdir(tmp_path / 'checkpoints_corrupt')) == ['1', '2']


def write_config(config, path):
  """A config file that rebuilds `config` (for runs in a subprocess)."""
  path.write_text(
      'import ml_collections\n'
      f'def get_config(variant=""):\n  return ml_collections.ConfigDict({config.to_dict()!r})\n')
  return str(path)


# A growing learner's tree after a kill: gMoE here; every learner resumes mid-stream in
# test_learners.py. 'host': the data streamed from host memory (alma_jax/placement.py).
@pytest.mark.parametrize('learner,where', [('finetune', 'device'), ('gmoe', 'device'),
                                           ('finetune', 'host')])
def test_kill_and_resume_gives_the_same_anytime_errors(config, tmp_path, learner, where):
  config.data.placement = where
  config.learner.name = learner
  config.model.name = 'moe_mlp' if learner == 'gmoe' else 'mlp'
  if learner == 'gmoe':
    config.learner.grow_every = 2
  config.stream.num_megabatches = 6
  config.train.update(max_epochs=6, patience=6)
  config_file = write_config(config, tmp_path / 'cfg.py')
  command = [sys.executable, '-m', 'alma_jax.main', f'--config={config_file}']
  subprocess.run(command + [f'--workdir={tmp_path}/straight'], cwd=REPO, check=True,
                 capture_output=True, timeout=300)

  killed = tmp_path / 'killed'
  for arrival in (3, 5):  # kill twice, in different rounds of the stream
    kill_during_round(command + [f'--workdir={killed}'], arrival)
    assert len(errors(killed)) == arrival - 1  # it was stopped in that round
  subprocess.run(command + [f'--workdir={killed}'], cwd=REPO, check=True, capture_output=True,
                 timeout=300)
  assert errors(killed) == errors(tmp_path / 'straight')
  assert len(errors(killed)) == 6


def test_a_restart_in_the_same_second_keeps_one_events_file(tmp_path, monkeypatch):
  """TensorBoard event files are named by their start's second: a second start in the same
  second must not take the first file's name and then remove it as an earlier file."""
  import tensorboardX.event_file_writer
  monkeypatch.setattr(tensorboardX.event_file_writer.time, 'time', lambda: 1795000000.0)
  history = metrics.record(metrics.empty_history(2), 1, test_error=0.5, test_loss=1.0,
                           trained=1.0, train_flops=1.0, valid_flops=1.0, params=3.0,
                           epochs=1.0)
  for _ in range(2):
    with run._Writers(str(tmp_path), True, history):
      pass
  events = os.listdir(tmp_path / 'tensorboard')
  assert len(events) == 1
  assert _scalar_steps(tmp_path / 'tensorboard' / events[0], 'test_error') == [1]


def test_a_resume_that_would_delete_kept_checkpoints_is_refused(config, tmp_path, monkeypatch):
  config.stream.num_megabatches = 4
  run.run(config, str(tmp_path))  # max_to_keep 0: every arrival's checkpoint
  shutil.rmtree(tmp_path / 'checkpoints' / '4')  # as if killed before its checkpoint
  config.checkpoint.max_to_keep = 2
  with monkeypatch.context() as patched:
    no_data_loaded(patched)
    with pytest.raises(run.WorkdirError, match=r'would delete the checkpoints of arrivals '
                       r'\[1, 2\], which the run\'s own setting \(max_to_keep=0'):
      run.run(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2', '3']
  shutil.rmtree(tmp_path / 'checkpoints' / '3')
  shutil.rmtree(tmp_path / 'checkpoints' / '2')  # the next save keeps [1, 2]; the one after not
  with pytest.raises(run.WorkdirError, match=r'arrivals \[1\]'):
    run.run(config, str(tmp_path))
  config.checkpoint.max_to_keep = 0  # as started: resumes, keeping them all
  run.run(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2', '3', '4']
  config.checkpoint.max_to_keep = 2  # a finished run saves nothing more: nothing to delete
  run.run(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2', '3', '4']
