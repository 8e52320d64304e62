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
import threading
import time
import uuid
import zlib

import jax
import numpy as np

from alma_jax import backend, checkpoint, config as alma_config, data, learners, metrics
from alma_jax import placement
from alma_jax import sharding, stream as alma_stream, workdir as workdirs
from alma_jax.learners import base
# The workdir's file names and refusals, as callers of the driver know them.
from alma_jax.workdir import (CHECKPOINTS_DIR, CONFIG_FILE, LOCK_FILE,  # noqa: F401
                              METRICS_FILE, SUMMARY_FILE, WorkdirError)


class Interrupted(BaseException):
  """The run was asked to stop (SIGTERM: a preemption notice; SIGINT: Ctrl-C). Not an
  Exception, as KeyboardInterrupt is not: no handler of failures takes it for one."""

  def __init__(self, signal_name: str):
    super().__init__(signal_name)
    self.signal_name = signal_name


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
    # The signal this process received, or SIGTERM's name when only another process got one.
    yield lambda: (received or ['SIGTERM'])[0] if sharding.worst(int(bool(received))) else None
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


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
        f"config.optimizer.learning_rate); " + (f"checkpoints up to arrival {t - 1} are kept"
                                                if t > 1 else "no checkpoint was written"))
  history = metrics.record(
      history, t, trained=float(trained), test_error=test['error'], test_loss=test['loss'],
      train_flops=report.train_flops, valid_flops=report.valid_flops,
      reference_flops=report.reference_flops, train_examples=report.train_examples,
      train_tokens=report.train_examples * dataset.targets_per_example,
      epochs=report.epochs, params=learner.params(learner_state),
      buffer_bytes=alma_stream.held_examples(stream_state, stream, config.stream)
      * dataset.example_bytes,
      optimizer_bytes=report.optimizer_bytes,
      inference_flops=learner.inference_flops(learner_state),
      seconds=time.perf_counter() - began)
  return stream_state, learner_state, history


def _split_over_data(config, mesh, learner, learner_state) -> float:
  """With mesh.shard_params, the share of the learner's parameters FSDP splits over the data
  axis (the rest is whole on every device); 0 without."""
  if not config.mesh.shard_params:
    return 0.0
  return sharding.split_fraction(learner.parameters(learner_state), mesh.shape[sharding.DATA])


def _fingerprint(config, stream, data_checksums: dict) -> int:
  """A checksum of the protocol, the stream's mega-batches and the data."""
  crc = zlib.crc32(json.dumps(workdirs.config_dict(config), sort_keys=True).encode())
  for part in stream.train + stream.valid:
    crc = zlib.crc32(np.ascontiguousarray(part), crc)
  return zlib.crc32(json.dumps(data_checksums, sort_keys=True).encode(), crc)


def _say(text: str) -> None:
  if sharding.is_main_process():
    print(text, flush=True)


class _Writers:
  """The run's outputs, all rebuilt from the (checkpointed) history: JSON lines, TensorBoard,
  the console. Only process 0 writes. A restart rewrites `metrics.jsonl` and the TensorBoard
  events from the restored history, so a damaged file is repaired and no point is lost or
  doubled; the events of earlier starts are replaced by one file."""
  _SCALARS = ('test_error', 'test_loss', 'test_bits', 'cumulative_flops', 'params', 'epochs',
              'buffer_bytes', 'optimizer_bytes')

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
      # Event files are named by the second they start in: a unique suffix keeps a restart
      # within the same second from taking (and then removing) the earlier file's name.
      self.tensorboard = SummaryWriter(directory, filename_suffix=f'.{uuid.uuid4().hex[:12]}')
      for row in rows:
        self._add_scalars(row)
      self.tensorboard.flush()
      for path in earlier:
        os.remove(path)

  def _write_rows(self, rows: list[dict]) -> None:
    workdirs.write_atomic(os.path.join(self.workdir, METRICS_FILE),
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
  config = learners.with_defaults(config)
  alma_config.validate(config)
  backend.configure(config.backend)
  try:
    with backend.Compilations() as compiled, _interruptible() as stop_requested:
      history, startup, data_placement, resumed_after = _run(config, workdir, began,
                                                             stop_requested)
  except Interrupted as stop:
    # (a signal during a save still lets that checkpoint finish: ask the directory)
    last = max(checkpoint.saved_steps(os.path.join(workdir, CHECKPOINTS_DIR)), default=0)
    where = f'after arrival {last}, its checkpoint written' if last else 'before any checkpoint'
    _say(f'{stop.signal_name}: interrupted {where}; run the same command to resume.')
    raise
  path = os.path.join(workdir, SUMMARY_FILE)
  if resumed_after == config.stream.num_megabatches and os.path.exists(path):
    with open(path) as f:  # a finished run: its summary stays that of the run that finished it
      summary = {**metrics.summary(history), **json.load(f)}  # (keys added since: from history)
    _say(metrics.format_summary(summary))
    return summary
  timings = {'startup_seconds': startup, 'compile_seconds': compiled.seconds,
             'compilations': compiled.count, 'compilations_from_cache': compiled.loaded}
  summary = {**metrics.summary(history), **timings, 'data_placement': data_placement}
  if sharding.is_main_process():
    workdirs.write_atomic(os.path.join(workdir, SUMMARY_FILE), json.dumps(summary, indent=2))
  _say(metrics.format_summary(summary))
  return summary


def _mesh(config):
  """The (member, data) mesh of a validated `config`."""
  return sharding.make_mesh(config.mesh.data, config.mesh.member)


def _build(config, mesh):
  """The data set, stream and learner of a validated `config` over `mesh`, and where the data
  is read from ('device' or 'host')."""
  data_devices = mesh.shape[sharding.DATA]
  microbatch = config.train.batch_size // config.train.microbatches
  if microbatch % data_devices:
    raise ValueError(f'config.train.batch_size={config.train.batch_size}: its '
                     f'{config.train.microbatches} microbatch(es) of {microbatch} must divide '
                     f'evenly over the {data_devices} devices of the data axis')
  dataset = sharding.on_every_process('reading the data', lambda: data.load(config.data))
  stream = alma_stream.make_stream(len(dataset.train_labels), config.stream.num_megabatches,
                                   config.stream.permutation_seed,
                                   config.stream.validation_fraction)
  where = placement.choose(config.data, dataset)
  if where == 'host' and config.train.eval_batch_size % data_devices:
    raise ValueError(f'config.train.eval_batch_size={config.train.eval_batch_size}: data read '
                     f'from the hosts is evaluated in blocks that must divide evenly over the '
                     f'{data_devices} devices of the data axis')
  learner = learners.create(config, dataset, placement.place(dataset, mesh, where), mesh)
  return dataset, stream, learner, where


def plan(config) -> dict:
  """What a run of `config` would do, without running it or touching a workdir (--dry_run):
  its stream, rounds, data sizes, the learner's parameters and FLOPs, the mesh."""
  config = learners.with_defaults(config)
  alma_config.validate(config)
  mesh = _mesh(config)
  dataset, stream, learner, where = _build(config, mesh)
  s = config.stream
  flops = learner.flops()
  state = learner.init(jax.random.key(config.seed))
  return {
      'arrivals': stream.num_megabatches,
      'rounds_after_arrivals': [t for t in range(1, stream.num_megabatches + 1)
                                if alma_stream.should_train(t, s.waiting_time,
                                                            stream.num_megabatches,
                                                            s.train_on_last)],
      'train_examples_per_megabatch': [len(x) for x in stream.train],
      'validation_examples_per_megabatch': [len(x) for x in stream.valid],
      'test_examples': len(dataset.test_labels),
      'params_at_start': learner.params(state),
      # FSDP: the share of the parameters split over the data axis (the rest is whole on
      # every device); 0 without mesh.shard_params.
      'params_split_over_data': _split_over_data(config, mesh, learner, state),
      'train_step_flops': flops['step'], 'forward_flops_per_example': flops['forward'],
      'data_placement': where,
      'data_bytes': placement.data_bytes(dataset),
      'mesh': dict(mesh.shape), 'backend': jax.default_backend(),
  }


def _run(config, workdir: str, began: float,
         stop_requested) -> tuple[dict, float, str, int]:
  """The arrivals left; the history, the seconds from `began` to the first arrival, where the
  data was read from ('device' or 'host'), and the arrival the run was resumed after."""
  sharding.on_every_process(f'checking workdir {workdir!r}',  # before creating anything
                            lambda: workdirs.check(config, workdir))
  sharding.on_every_process(f'creating {workdir}', lambda: sharding.is_main_process() and
                            os.makedirs(workdir, exist_ok=True))  # (then it exists for all)
  with workdirs.locked(workdir):
    workdirs.prepare(config, workdir)  # checks again, now that no other run can change it
    return _run_locked(config, workdir, began, stop_requested)


def _run_locked(config, workdir: str, began: float,
                stop_requested) -> tuple[dict, float, str, int]:
  directory = os.path.join(workdir, CHECKPOINTS_DIR)
  num_arrivals = config.stream.num_megabatches

  def checked_steps():  # the refusals that need no data come first
    steps = checkpoint.saved_steps(directory)
    workdirs.check_checkpoints(steps, workdir, num_arrivals)
    workdirs.check_results_are_checkpointed(workdir, max(steps, default=0))
    return steps
  steps = sharding.on_every_process(f'checking the checkpoints in {directory!r}', checked_steps)
  sharding.check_hosts_agree(f'the checkpoints in {directory!r}',
                             zlib.crc32(json.dumps(steps).encode()), workdirs.SHARED_WORKDIR)
  mesh = _mesh(config)
  dataset, stream, learner, where = _build(config, mesh)
  data_checksums = dataset.checksums()
  sharding.on_every_process('checking the data against the run\'s', lambda: (
      workdirs.check_same_data(workdir, dataset, config.data, data_checksums)))
  sharding.check_hosts_agree('the config, the stream and the data',
                             _fingerprint(config, stream, data_checksums))
  key = jax.random.key(config.seed)

  with checkpoint.Checkpointer(directory, config.checkpoint.max_to_keep, mesh,
                               config.mesh.shard_params) as checkpointer:
    start, tree = checkpointer.restore_latest()
    workdirs.check_results_are_checkpointed(workdir, start)
    if tree is None:
      stream_state = alma_stream.init_state(stream.num_examples)
      history = metrics.empty_history(num_arrivals)
      learner_state = learner.init(jax.random.fold_in(key, 0))
    else:
      stream_state = alma_stream.StreamState.from_tree(tree['stream'])
      history = metrics.completed(tree['history'])  # (a run of an earlier version's too)
      learner_state = learner.restore(tree['learner'])
      _say(f'{workdir} is finished: its {num_arrivals} arrivals are done.' if start == num_arrivals
           else f'Resuming {workdir} after arrival {start} of {num_arrivals}.')

    startup = time.perf_counter() - began
    split = _split_over_data(config, mesh, learner, learner_state)
    with sharding.on_every_process('starting the outputs', lambda: _Writers(
        workdir, config.log.tensorboard, history)) as writers:
      for t in range(start + 1, num_arrivals + 1):
        stopping = stop_requested()
        if stopping:
          raise Interrupted(stopping)
        stream_state, learner_state, history = _arrival(
            t, config, stream, dataset, learner, key, stream_state, learner_state, history)
        grown = _split_over_data(config, mesh, learner, learner_state)
        if grown < split - 0.005:  # growth added leaves the data axis does not divide
          _say(f'FSDP: after arrival {t} the data axis splits {grown:.1%} of the parameters '
               f'(was {split:.1%}): grown leaves none of whose sizes its '
               f'{mesh.shape[sharding.DATA]} devices divide are whole on every device')
          split = grown
        elif grown > split:  # (smaller declines add up until said)
          split = grown
        checkpointer.save(t, sharding.checkpointable(
            {'stream': stream_state.to_tree(), 'learner': base.to_tree(learner_state),
             'history': history}))
        sharding.on_every_process(f"writing arrival {t}'s row",  # (process 0 writes it)
                                  lambda: writers.arrival(history, t))
  return history, startup, where, start
