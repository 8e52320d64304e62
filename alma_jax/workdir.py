"""The workdir of a run: what may be written there, by whom, and when a run may resume there.

A workdir holds one run: its config (a resume must keep the protocol), a lock while a process
runs it, checksums of the data it started on, its checkpoints and its results. Nothing a user
saved is overwritten: another run's workdir, results whose checkpoints were lost, checkpoints
this run cannot have written and data that changed are refused, naming the problem; a start that
got no result (a typo in a path, a kill while writing the config) does not claim the workdir.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import string
import time
import uuid
import zlib

import jax

from alma_jax import checkpoint, config as alma_config, sharding

CONFIG_FILE = 'config.json'
LOCK_FILE = 'lock'
DATA_FILE = 'data.json'
METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'
CHECKPOINTS_DIR = 'checkpoints'


class WorkdirError(ValueError):
  """The workdir holds something this run must not touch."""


def config_dict(config) -> dict:
  return json.loads(json.dumps(config.to_dict()))


def prepare(config, workdir: str) -> None:
  """Checks that `workdir` is new, holds a run of the same protocol (a resume) or a start that
  got no results, on every process; then process 0 removes what killed writes left and writes
  the config there."""
  sharding.on_every_process(f'checking workdir {workdir!r}', lambda: check(config, workdir))

  def write():
    for name in os.listdir(workdir) if os.path.isdir(workdir) else ():
      if _killed_write(name):
        os.remove(os.path.join(workdir, name))
    if not _has_results(workdir):  # new, or a start that failed
      os.makedirs(workdir, exist_ok=True)
      write_atomic(os.path.join(workdir, CONFIG_FILE),
                   json.dumps(config_dict(config), indent=2, sort_keys=True))
  sharding.on_every_process(f'writing the config into {workdir!r}',
                            lambda: sharding.is_main_process() and write())


@contextlib.contextmanager
def locked(workdir: str):
  """Holds the workdir's lock file for the run (process 0 for all processes): a second run
  started on the workdir is refused, naming the holder. A lock left by a process of this host
  that no longer exists (killed), or left empty for UNWRITTEN_LOCK_SECONDS, is stale and taken
  over."""
  path = os.path.join(workdir, LOCK_FILE)
  sharding.on_every_process(f'locking workdir {workdir!r}',
                            lambda: sharding.is_main_process() and _acquire(path))
  try:
    if jax.process_count() > 1:
      seen = sharding.on_every_process(f'reading the lock file of {workdir!r}',
                                       lambda: _read_shared(path))
      sharding.check_hosts_agree(f'the lock file {path} that process 0 wrote', seen,
                                 SHARED_WORKDIR)
    yield
  finally:
    if sharding.is_main_process() and os.path.exists(path):
      os.remove(path)


SHARED_WORKDIR = ('every process must see one workdir, on a file system that all hosts share '
                  '(docs/macroscale.md#on-a-pod-or-a-cluster)')
SHARED_WAIT_SECONDS = 60  # (a shared file system may show another host's new file late)


def _read_shared(path: str) -> int:
  """A checksum of the lock file process 0 wrote, as this process sees it."""
  deadline = time.monotonic() + SHARED_WAIT_SECONDS
  while True:
    try:
      with open(path, 'rb') as f:
        content = f.read()
      if content:
        return zlib.crc32(content)
    except FileNotFoundError:
      pass
    if time.monotonic() > deadline:
      raise WorkdirError(f'process {jax.process_index()} does not see the lock file {path} that '
                         f'process 0 wrote: {SHARED_WORKDIR}')
    time.sleep(0.5)


def _acquire(path: str) -> None:
  holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'pids': _pid_namespace(),
            'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      judged = _identity(path)
      other = _holder(path)
      if judged is None or _identity(path) != judged:  # replaced while read: look again
        continue
      ours = other.get('pid') == holder['pid'] and other.get('pids') == holder['pids'] != 0
      gone = other.get('host') == holder['host'] and (ours or not _alive(other.get('pid')))
      # Stale: its process is gone (or had our PID, in our PID namespace: an earlier process of
      # it), or died before writing its name.
      unwritten_for = time.time_ns() - judged[1]  # (its modification time)
      if ((gone or (not other and unwritten_for > UNWRITTEN_LOCK_SECONDS * 10 ** 9))
          and _take_away(path, judged)):
        continue
      who = (f"host {other.get('host')}, PID {other.get('pid')}, started "
             f"{other.get('started')}" if other else
             f'its lock file is not written yet; taken over when older than '
             f'{UNWRITTEN_LOCK_SECONDS} s')
      raise WorkdirError(f'workdir {os.path.dirname(path)!r} is in use by another run ({who}); '
                         f'if that process is gone, delete {path}') from None
    else:
      with os.fdopen(fd, 'w') as f:
        json.dump(holder, f)
      return
  raise WorkdirError(f'workdir {os.path.dirname(path)!r}: its lock file {path} keeps changing '
                     f'(other runs starting on it?)')


# A lock file still empty or unreadable this long after it was created was left by a process
# killed between creating and writing it (which takes microseconds).
UNWRITTEN_LOCK_SECONDS = 30
STALE_LOCK = '.stale-'  # a stale lock file being removed: LOCK_FILE + this + 8 hex digits


def _pid_namespace() -> int:
  """Which PID namespace this process is in (Linux; 0 elsewhere): containers that share a
  host name may each have a process of any one PID."""
  try:
    return os.stat('/proc/self/ns/pid').st_ino
  except OSError:
    return 0


def _identity(path: str) -> tuple[int, int] | None:
  """Which file `path` is (inode, modification time), or None if there is none."""
  try:
    status = os.stat(path)
  except FileNotFoundError:
    return None
  return status.st_ino, status.st_mtime_ns


def _take_away(path: str, judged: tuple[int, int]) -> bool:
  """Removes the stale lock file `judged`; False where another start had taken the lock over
  meanwhile (its file, renamed away by mistake, is put back)."""
  aside = f'{path}{STALE_LOCK}{uuid.uuid4().hex[:8]}'
  try:
    os.rename(path, aside)
  except FileNotFoundError:  # another start removed it first
    return True
  if _identity(aside) == judged:
    os.remove(aside)
    return True
  os.rename(aside, path)  # (never deleted: it is another start's)
  return False


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


def check(config, workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'workdir {workdir!r} is a file, not a directory')
  above = os.path.dirname(os.path.abspath(workdir))
  while not os.path.exists(above):
    above = os.path.dirname(above)
  if not os.path.isdir(above):
    raise WorkdirError(f'workdir {workdir!r} cannot be created: {above!r} is a file, not a '
                       f'directory')
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    saved = _saved_config(path)
    differences = alma_config.protocol_differences(saved, config_dict(config))
    if differences and _has_results(workdir):
      now = config_dict(config)
      shown = ', '.join(f'{k} (saved {_lookup(saved, k)!r}, now {_lookup(now, k)!r})'
                        for k in differences[:5])
      shown += f' and {len(differences) - 5} more' if len(differences) > 5 else ''
      raise WorkdirError(
          f'workdir {workdir!r} holds a run with a different protocol: {shown}. Use a new '
          f'--workdir, or resume it with the command that started it (its config is in {path}).')
    _check_kept_checkpoints(saved, config, workdir)
    return
  ours = lambda name: (name == LOCK_FILE or name.startswith(LOCK_FILE + STALE_LOCK)
                       or _killed_write(name))
  if os.path.isdir(workdir) and not all(map(ours, os.listdir(workdir))):
    if _has_results(workdir):
      raise WorkdirError(f'workdir {workdir!r} holds checkpoints or results but no '
                         f'{CONFIG_FILE} (deleted?): put it back, or use a new --workdir.')
    raise WorkdirError(f'workdir {workdir!r} is not empty and holds no {CONFIG_FILE}: it is not '
                       f'an alma_jax run; refusing to write into it.')


def _check_kept_checkpoints(saved: dict, config, workdir: str) -> None:
  """Refuses a resume whose `checkpoint.max_to_keep` would, by the run's end, delete checkpoints
  that the setting the run was started with keeps (Orbax keeps the newest n at every save)."""
  keep, kept_before = config.checkpoint.max_to_keep, _lookup(saved, 'checkpoint.max_to_keep')
  if not keep or kept_before is None:
    return
  steps = checkpoint.saved_steps(os.path.join(workdir, CHECKPOINTS_DIR))
  if not steps or steps[-1] >= config.stream.num_megabatches:  # (a finished run saves no more)
    return
  every = steps + list(range(steps[-1] + 1, config.stream.num_megabatches + 1))
  deleted = lambda n: set(steps) - set(every[-n:]) if n else set()
  lost = sorted(deleted(keep) - deleted(kept_before))
  if lost:
    raise WorkdirError(
        f'config.checkpoint.max_to_keep={keep}: resuming workdir {workdir!r} with it would '
        f'delete the checkpoints of arrivals {lost}, which the run\'s own setting '
        f'(max_to_keep={kept_before}; 0 keeps all) keeps. Resume with '
        f'max_to_keep={kept_before}, or move the checkpoints you want elsewhere first.')


def _saved_config(path: str) -> dict:
  try:
    with open(path) as f:
      saved = json.load(f)
  except ValueError as error:
    raise WorkdirError(f'{path} is not a readable run config ({error}): restore it, or use a '
                       f'new --workdir') from None
  if not alma_config.is_saved_config(saved):
    raise WorkdirError(f'{path} is not an alma_jax run\'s config (a JSON object with the '
                       f'sections {", ".join(alma_config.SAVED_SECTIONS)}): the workdir holds '
                       f'other files; refusing to write into it. Use a new --workdir.')
  return saved


def _has_results(workdir: str) -> bool:
  """Whether a start in `workdir` got as far as a committed checkpoint or a row of results;
  until then a corrected command may start it afresh."""
  checkpoints = os.path.join(workdir, CHECKPOINTS_DIR)
  committed = os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))
  return committed or os.path.exists(os.path.join(workdir, METRICS_FILE))


def _lookup(tree: dict, dotted: str):
  for part in dotted.split('.'):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def _killed_write(name: str) -> bool:
  """Whether `name` is a temporary file that a killed `write_atomic` left in a workdir (or one
  of 0.7, named `FILE.tmp`)."""
  written, dot_tmp, suffix = name.partition('.tmp')
  return (written in (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, DATA_FILE) and bool(dot_tmp)
          and (suffix == '' or (len(suffix) == 9 and suffix[0] == '-'
                                and all(c in string.hexdigits for c in suffix[1:]))))


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` whole or not at all (a temporary file of its own, then renamed)."""
  temporary = f'{path}.tmp-{uuid.uuid4().hex[:8]}'
  with open(temporary, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())  # (else a crash of the machine may leave the renamed file empty)
  os.replace(temporary, path)


def check_checkpoints(steps: list[int], workdir: str, num_arrivals: int) -> None:
  """Refuses checkpoints this run cannot have written (numbered beyond its T arrivals)."""
  stray = [step for step in steps if step > num_arrivals]
  if stray:
    raise WorkdirError(
        f'workdir {workdir!r} holds checkpoints {stray} but this run has only {num_arrivals} '
        f'arrivals (stream.num_megabatches): they are not this run\'s; move them away')


def check_results_are_checkpointed(workdir: str, start: int) -> None:
  """Refuses to restart from scratch a run whose results show it got further: its checkpoints
  were deleted or replaced (rows are written after their checkpoint is begun, so a run killed
  before its first checkpoint has at most one)."""
  path = os.path.join(workdir, METRICS_FILE)
  if start or not os.path.exists(path):
    return
  with open(path) as f:
    written = sum(1 for line in f if line.strip())
  if written > 1:
    aside = checkpoint.corrupt_directory(os.path.join(workdir, CHECKPOINTS_DIR))
    lost = (f'its checkpoints were found corrupt (kept in {aside})' if os.path.isdir(aside)
            else 'its checkpoints were lost')
    raise WorkdirError(
        f'workdir {workdir!r} holds results of {written} arrivals ({METRICS_FILE}) but no '
        f'checkpoint to resume from: {lost}, and running on would restart it from scratch. '
        f'Move the workdir aside or use a new --workdir.')


def check_same_data(workdir: str, dataset, data_config, parts: dict) -> None:
  """Refuses to resume a run on data that changed since it started (at the same path, say),
  naming the arrays that differ; a new run records `parts`, its `dataset.checksums()`."""
  path = os.path.join(workdir, DATA_FILE)
  if _has_results(workdir) and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if any(isinstance(saved.get(name), int) and not isinstance(parts[name], int)
           for name in parts):  # a corpus's crc32s saved by 0.6: read it through to compare
      parts = dataset.checksums(read=True)
    changed = [name for name in parts if name in saved and saved[name] != parts[name]]
    if changed:
      where = data_config.path or data_config.name
      raise WorkdirError(
          f'the data set {where!r} differs from the one run {workdir!r} started on '
          f'({", ".join(changed)} changed): resuming would mix two data sets. Restore the data, '
          f'or use a new --workdir.')
  elif sharding.is_main_process():
    write_atomic(path, json.dumps(parts, indent=2))
