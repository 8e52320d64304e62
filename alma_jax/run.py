"""The driver: stream -> learner -> evaluation -> checkpoint, one arrival at a time.

The run is a fold of one transition over the stream's T arrivals. After arrival t the learner
trains if the waiting time says so, the predictor it holds is evaluated on the test set (whether
or not it trained), and the whole run state {stream, learner, history} is checkpointed, so a
killed run resumes exactly where it stopped. The driver knows no learner, model or data set.

With several processes (hosts), every process runs this same loop over the same stream (checked
at start-up) on its share of the mesh; process 0 alone writes the workdir's files and the
console, and all processes write their shards of each checkpoint.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import socket
import threading
import time
import zlib

import jax
import numpy as np

from alma_jax import backend, checkpoint, config as alma_config, data, learners, metrics, models
from alma_jax import optim
from alma_jax import sharding, stream as alma_stream
from alma_jax.learners import base

CONFIG_FILE = 'config.json'
LOCK_FILE = 'lock'
DATA_FILE = 'data.json'
METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'


class WorkdirError(ValueError):
  """The workdir holds something this run must not touch."""


class Interrupted(Exception):
  """The run was asked to stop (SIGTERM: a preemption notice; SIGINT: Ctrl-C)."""

  def __init__(self, signal_name: str, arrival: int | None = None):
    super().__init__(signal_name)
    self.signal_name, self.arrival = signal_name, arrival


@contextlib.contextmanager
def _interruptible():
  """SIGTERM and SIGINT stop the run: at once with one process (the round in progress is
  redone on resume); with several, all stop together after the arrival in progress (a second
  signal stops at once). Yields whether all processes agreed to stop."""
  received = []

  def handler(signum, frame):
    del frame
    received.append(signal.Signals(signum).name)
    if jax.process_count() == 1 or len(received) > 1:
      raise Interrupted(received[-1])

  if threading.current_thread() is not threading.main_thread():
    yield lambda: None
    return
  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield lambda: (received or ['SIGTERM'])[0] if sharding.worst(int(bool(received))) else None
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _config_dict(config) -> dict:
  return json.loads(json.dumps(config.to_dict()))


def prepare_workdir(config, workdir: str) -> None:
  """Checks that `workdir` is new, holds a run of the same protocol (a resume) or a start that
  got no results, on every process; then process 0 writes the config there."""
  _check_workdir(config, workdir)
  sharding.barrier('alma_jax.workdir.checked')
  path = os.path.join(workdir, CONFIG_FILE)
  if sharding.is_main_process() and not _has_results(workdir):  # new, or a start that failed
    os.makedirs(workdir, exist_ok=True)
    _write_atomic(path, json.dumps(_config_dict(config), indent=2, sort_keys=True))
  sharding.barrier('alma_jax.workdir.created')


@contextlib.contextmanager
def locked(workdir: str):
  """Holds the workdir's lock file for the run (process 0 for all processes): a second run
  started on the workdir is refused, naming the holder. A lock left by a process of this host
  that no longer exists (killed) is stale and taken over."""
  path = os.path.join(workdir, LOCK_FILE)
  error = None
  if sharding.is_main_process():
    try:
      _acquire(path)
    except WorkdirError as e:
      error = e
  if sharding.worst(int(error is not None)):
    raise error or WorkdirError(f'workdir {workdir!r} is locked by another run (see process 0)')
  try:
    yield
  finally:
    if sharding.is_main_process():
      os.remove(path)


def _acquire(path: str) -> None:
  holder = {'host': socket.gethostname(), 'pid': os.getpid(),
            'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      other = _holder(path)
      if other.get('host') == holder['host'] and not _alive(other.get('pid')):
        os.remove(path)  # stale: its process is gone
        continue
      raise WorkdirError(
          f"workdir {os.path.dirname(path)!r} is in use by another run (host "
          f"{other.get('host')}, PID {other.get('pid')}, started {other.get('started')}); if "
          f"that process is gone, delete {path}") from None
    with os.fdopen(fd, 'w') as f:
      json.dump(holder, f)
    return


def _holder(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):  # being written, or emptied: as held by an unknown process
    return {}


def _alive(pid) -> bool:
  if not isinstance(pid, int):
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _check_workdir(config, workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'workdir {workdir!r} is a file, not a directory')
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    saved = _saved_config(path)
    differences = alma_config.protocol_differences(saved, _config_dict(config))
    if differences and _has_results(workdir):
      now = _config_dict(config)
      shown = ', '.join(f'{k} (saved {_lookup(saved, k)!r}, now {_lookup(now, k)!r})'
                        for k in differences[:5])
      raise WorkdirError(
          f'workdir {workdir!r} holds a run with a different protocol: {shown}. Use a new '
          f'--workdir, or resume it with the command that started it (its config is in {path}).')
    return
  ours = {CONFIG_FILE + '.tmp', LOCK_FILE}
  if os.path.isdir(workdir) and set(os.listdir(workdir)) - ours:
    if _has_results(workdir):
      raise WorkdirError(f'workdir {workdir!r} holds checkpoints or results but no '
                         f'{CONFIG_FILE} (deleted?): put it back, or use a new --workdir.')
    raise WorkdirError(f'workdir {workdir!r} is not empty and holds no {CONFIG_FILE}: it is not '
                       f'an alma_jax run; refusing to write into it.')


def _saved_config(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as error:
    raise WorkdirError(f'{path} is not a readable run config ({error}): restore it, or use a '
                       f'new --workdir') from None


def _has_results(workdir: str) -> bool:
  """Whether a start in `workdir` got as far as a committed checkpoint or a row of results;
  until then a corrected command may start it afresh."""
  checkpoints = os.path.join(workdir, 'checkpoints')
  committed = os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))
  return committed or os.path.exists(os.path.join(workdir, METRICS_FILE))


def _lookup(tree: dict, dotted: str):
  for part in dotted.split('.'):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def _write_atomic(path: str, text: str) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def _arrival(t, config, stream, dataset, learner, key, stream_state, learner_state, history):
  """Arrival t: a training round if the waiting time says so, then the test evaluation of the
  predictor held; the new stream and learner states and the history with row t."""
  began = time.perf_counter()
  num_arrivals = stream.num_megabatches
  stream_state = alma_stream.arrive(stream_state)
  report = base.RoundReport()
  trained = alma_stream.should_train(t, config.stream.waiting_time, num_arrivals,
                                     config.stream.train_on_last)
  if trained:
    round_data, stream_state = alma_stream.next_round(stream_state, stream, config.stream,
                                                      config.seed)
    learner_state, report = learner.train_round(learner_state, round_data,
                                                jax.random.fold_in(key, t))
  test = learner.evaluate(learner_state)
  if not np.isfinite(test['loss']):
    raise FloatingPointError(
        f"test loss {test['loss']} after arrival {t}: training diverged (try a lower "
        f"config.optimizer.learning_rate); checkpoints up to arrival {t - 1} are kept")
  history = metrics.record(
      history, t, trained=float(trained), test_error=test['error'], test_loss=test['loss'],
      train_flops=report.train_flops, valid_flops=report.valid_flops,
      reference_flops=report.reference_flops, train_examples=report.train_examples,
      train_tokens=report.train_examples * dataset.targets_per_example,
      epochs=report.epochs, params=learner.params(learner_state),
      inference_flops=learner.inference_flops(learner_state),
      seconds=time.perf_counter() - began)
  return stream_state, learner_state, history


def _check_checkpoints(steps: list[int], workdir: str, num_arrivals: int) -> None:
  """Refuses checkpoints this run cannot have written (numbered beyond its T arrivals)."""
  stray = [step for step in steps if step > num_arrivals]
  if stray:
    raise WorkdirError(
        f'workdir {workdir!r} holds checkpoints {stray} but this run has only {num_arrivals} '
        f'arrivals (stream.num_megabatches): they are not this run\'s; move them away')


def _check_results_are_checkpointed(workdir: str, start: int) -> None:
  """Refuses to restart from scratch a run whose results show it got further: its checkpoints
  were deleted or replaced (rows are written after their checkpoint is begun, so a run killed
  before its first checkpoint has at most one)."""
  path = os.path.join(workdir, METRICS_FILE)
  if start or not os.path.exists(path):
    return
  with open(path) as f:
    written = sum(1 for line in f if line.strip())
  if written > 1:
    raise WorkdirError(
        f'workdir {workdir!r} holds results of {written} arrivals ({METRICS_FILE}) but no '
        f'checkpoint to resume from: its checkpoints were lost, and running on would restart '
        f'it from scratch. Move the workdir aside or use a new --workdir.')


def device_data(dataset, mesh) -> base.DeviceData:
  """The data set's arrays on the mesh, replicated: what `learners.create` trains from."""
  put = lambda x: sharding.global_array(x, sharding.replicated(mesh))
  return base.DeviceData(put(dataset.train_images), put(dataset.train_labels),
                         put(dataset.test_images), put(dataset.test_labels))


def _fingerprint(config, stream, dataset) -> int:
  """A checksum of the protocol, the stream's mega-batches and the training labels."""
  crc = zlib.crc32(json.dumps(_config_dict(config), sort_keys=True).encode())
  for part in stream.train + stream.valid + (dataset.train_labels,):
    crc = zlib.crc32(np.ascontiguousarray(part).tobytes(), crc)
  return crc


def _check_same_data(workdir: str, dataset, data_config) -> None:
  """Refuses to resume a run on data that changed since it started (at the same path, say),
  naming the arrays that differ; a new run records checksums of its arrays."""
  parts = {name: zlib.crc32(np.ascontiguousarray(getattr(dataset, name)).tobytes())
           for name in ('train_images', 'train_labels', 'test_images', 'test_labels')}
  path = os.path.join(workdir, DATA_FILE)
  if _has_results(workdir) and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    changed = [name for name in parts if name in saved and saved[name] != parts[name]]
    if changed:
      where = data_config.path or data_config.name
      raise WorkdirError(
          f'the data set {where!r} differs from the one run {workdir!r} started on '
          f'({", ".join(changed)} changed): resuming would mix two data sets. Restore the data, '
          f'or use a new --workdir.')
  elif sharding.is_main_process():
    _write_atomic(path, json.dumps(parts, indent=2))


def _say(text: str) -> None:
  if sharding.is_main_process():
    print(text, flush=True)


class _Writers:
  """The run's outputs, all rebuilt from the (checkpointed) history: JSON lines, TensorBoard,
  the console. Only process 0 writes. A restart rewrites `metrics.jsonl` and the TensorBoard
  events from the restored history, so a damaged file is repaired and no point is lost or
  doubled; the events of earlier starts are replaced by one file."""
  _SCALARS = ('test_error', 'test_loss', 'test_bits', 'cumulative_flops', 'params', 'epochs')

  def __init__(self, workdir: str, tensorboard: bool, history: dict):
    self.workdir = workdir
    self.enabled = sharding.is_main_process()
    self.tensorboard = None
    rows = metrics.rows(history)
    _say(metrics.TABLE_HEADER)
    for row in rows:
      _say(metrics.format_row(row))
    if not self.enabled:
      return
    if rows:
      self._write_rows(rows)
    if tensorboard:
      from tensorboardX import SummaryWriter
      directory = os.path.join(workdir, 'tensorboard')
      earlier = glob.glob(os.path.join(directory, 'events.out.tfevents.*'))
      self.tensorboard = SummaryWriter(directory)
      for row in rows:
        self._add_scalars(row)
      self.tensorboard.flush()
      for path in earlier:
        os.remove(path)

  def _write_rows(self, rows: list[dict]) -> None:
    _write_atomic(os.path.join(self.workdir, METRICS_FILE),
                  ''.join(json.dumps(r) + '\n' for r in rows))

  def _add_scalars(self, row: dict) -> None:
    for name in self._SCALARS:
      self.tensorboard.add_scalar(name, row[name], row['t'])

  def arrival(self, history: dict, t: int) -> None:
    if not self.enabled:
      return
    rows = metrics.rows(history)
    self._write_rows(rows)
    if self.tensorboard:
      self._add_scalars(rows[t - 1])
      self.tensorboard.flush()
    print(metrics.format_row(rows[t - 1]), flush=True)

  def __enter__(self) -> '_Writers':
    return self

  def __exit__(self, *exc) -> None:
    if self.tensorboard:
      self.tensorboard.close()


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the ALMA protocol of `config` in `workdir`; returns the summary."""
  began = time.perf_counter()
  alma_config.validate(config, learners.names(), models.names(), optim.names())
  backend.configure(config.backend)
  try:
    with backend.Compilations() as compiled, _interruptible() as stop_requested:
      history, startup = _run(config, workdir, began, stop_requested)
  except Interrupted as stop:
    where = ('before its first arrival' if stop.arrival is None else
             f'after arrival {stop.arrival}, its checkpoint written')
    _say(f'{stop.signal_name}: interrupted {where}; run the same command to resume.')
    raise
  timings = {'startup_seconds': startup, 'compile_seconds': compiled.seconds,
             'compilations': compiled.count, 'compilations_from_cache': compiled.loaded}
  summary = {**metrics.summary(history), **timings}
  if sharding.is_main_process():
    _write_atomic(os.path.join(workdir, SUMMARY_FILE), json.dumps(summary, indent=2))
  _say(metrics.format_summary(summary))
  return summary


def plan(config) -> dict:
  """What a run of `config` would do, without running it or touching a workdir (--dry_run):
  its stream, rounds, data sizes, the learner's parameters and FLOPs, the mesh."""
  alma_config.validate(config, learners.names(), models.names(), optim.names())
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.member)
  dataset = data.load(config.data)
  stream = alma_stream.make_stream(len(dataset.train_labels), config.stream.num_megabatches,
                                   config.stream.permutation_seed,
                                   config.stream.validation_fraction)
  learner = learners.create(config, dataset, device_data(dataset, mesh), mesh)
  s = config.stream
  flops = learner.flops()
  return {
      'arrivals': stream.num_megabatches,
      'rounds_after_arrivals': [t for t in range(1, stream.num_megabatches + 1)
                                if alma_stream.should_train(t, s.waiting_time,
                                                            stream.num_megabatches,
                                                            s.train_on_last)],
      'train_examples_per_megabatch': [len(x) for x in stream.train],
      'validation_examples_per_megabatch': [len(x) for x in stream.valid],
      'test_examples': len(dataset.test_labels),
      'params_at_start': learner.params(learner.init(jax.random.key(config.seed))),
      'train_step_flops': flops['step'], 'forward_flops_per_example': flops['forward'],
      'mesh': dict(mesh.shape), 'backend': jax.default_backend(),
  }


def _run(config, workdir: str, began: float, stop_requested) -> tuple[dict, float]:
  """The arrivals left; the history, and the seconds from `began` to the first arrival."""
  _check_workdir(config, workdir)  # before creating anything
  if sharding.is_main_process():
    os.makedirs(workdir, exist_ok=True)
  sharding.barrier('alma_jax.workdir.exists')
  with locked(workdir):
    prepare_workdir(config, workdir)  # again, now that no other run can change the workdir
    return _run_locked(config, workdir, began, stop_requested)


def _run_locked(config, workdir: str, began: float, stop_requested) -> tuple[dict, float]:
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.member)
  data_devices = mesh.shape[sharding.DATA]
  microbatch = config.train.batch_size // config.train.microbatches
  if microbatch % data_devices:
    raise ValueError(f'config.train.batch_size={config.train.batch_size}: its '
                     f'{config.train.microbatches} microbatch(es) of {microbatch} must divide '
                     f'evenly over the {data_devices} devices of the data axis')

  dataset = data.load(config.data)
  _check_same_data(workdir, dataset, config.data)
  stream = alma_stream.make_stream(len(dataset.train_labels), config.stream.num_megabatches,
                                   config.stream.permutation_seed,
                                   config.stream.validation_fraction)
  sharding.check_hosts_agree('the config, the stream and the data',
                             _fingerprint(config, stream, dataset))
  learner = learners.create(config, dataset, device_data(dataset, mesh), mesh)
  key = jax.random.key(config.seed)
  num_arrivals = stream.num_megabatches

  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                               config.checkpoint.max_to_keep, mesh) as checkpointer:
    _check_checkpoints(checkpointer.steps(), workdir, num_arrivals)
    start, tree = checkpointer.restore_latest()
    _check_results_are_checkpointed(workdir, start)
    if tree is None:
      stream_state = alma_stream.init_state(stream.num_examples)
      history = metrics.empty_history(num_arrivals)
      learner_state = learner.init(jax.random.fold_in(key, 0))
    else:
      stream_state, history = tree['stream'], tree['history']
      learner_state = learner.restore(tree['learner'])
      _say(f'Resuming {workdir} after arrival {start} of {num_arrivals}.')

    startup = time.perf_counter() - began
    with _Writers(workdir, config.log.tensorboard, history) as writers:
      done = start
      try:
        for t in range(start + 1, num_arrivals + 1):
          stopping = stop_requested()
          if stopping:
            raise Interrupted(stopping, done)
          stream_state, learner_state, history = _arrival(
              t, config, stream, dataset, learner, key, stream_state, learner_state, history)
          checkpointer.save(t, sharding.checkpointable(
              {'stream': stream_state, 'learner': base.to_tree(learner_state),
               'history': history}))
          writers.arrival(history, t)
          done = t
      except Interrupted as stop:
        stop.arrival = done if stop.arrival is None else stop.arrival
        raise
  return history, startup
