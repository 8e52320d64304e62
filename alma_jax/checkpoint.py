"""Orbax checkpoints of the whole run state, one per arrival.

The run state is saved as a plain tree. It is restored to the tree the checkpoint's own metadata
describes, so a tree whose shapes changed over the stream (a grown ensemble) restores as saved;
the learner then rebuilds its own structure from it. The learner's stacks of members (its
`variables` and `opt_state`) are restored onto the current mesh as a stack of members is placed
there (`sharding.stacked`: split over the member axis, and over the data axis with FSDP),
whatever the devices that wrote them (a checkpoint written on 8 devices restores on 1): each
device reads only its shards, so a state that fits only sharded also resumes. Other device
arrays are restored replicated; host arrays (stream, history) come back as numpy arrays.

Every checkpoint holds a checksum of each part of the tree it saved (stream, learner, history),
checked on restore, so flipped bits are found; a part can be read and checked alone (the
history, for the analysis of a run whose learner is large). A corrupt checkpoint (unreadable
files, wrong checksum) is moved aside (never deleted) and the one before it is used; any other
failure to restore (memory, I/O, a library) stops the run with its error. With several
processes, each reads its own shards with no collective, then all agree on the outcome before
the checksums' collectives: a checkpoint damaged in one host's files is passed over by every
process, where one process alone failing used to leave the others waiting in a barrier for
ever.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import traceback
import zlib

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from alma_jax import sharding


CHECKSUM = 'checksum'
MEMBER_STACKS = ('variables', 'opt_state')  # of the run state's 'learner'
ITEM = 'default'  # the folder of a step where a manager of one unnamed item keeps it


def _drop_failed_read_reports() -> None:
  """From now on, drops the unraisable errors that a failed read leaves behind, and only
  those: Orbax closes its event loop while tensorstore still has reads in flight, and each of
  them, as it completes (while the failure is raised, or after), reports 'Event loop is closed'
  (dozens of tracebacks on stderr a checkpoint); and Orbax's read that was left unfinished
  raises when the garbage collector closes it, whenever that happens (a traceback for each
  failed read, long after it was handled). Installed before a read, since some complete before
  the failure is caught. Other unraisable errors are reported as before."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_failed_read_reports', False):
    return

  def hook(unraisable):
    try:
      dropped = _left_by_a_failed_read(unraisable)
    except Exception:  # (a report this cannot read is reported)
      dropped = False
    if not dropped:
      previous(unraisable)
  hook.drops_failed_read_reports = True
  sys.unraisablehook = hook


def _left_by_a_failed_read(unraisable) -> bool:
  if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == 'Event loop is closed':
    # a callback scheduled on the closed loop (a transport left open reports it from __del__)
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return unraisable.object is None and bool(frames) and frames[-1].name == '_check_closed'
  code = getattr(unraisable.object, 'cr_code', None)  # a coroutine, closed unfinished
  return (code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename
          and isinstance(getattr(unraisable.exc_value, '__cause__', None), GeneratorExit))


class CorruptCheckpointError(ValueError):
  """A checkpoint's files do not hold the tree that was saved."""


# What reading damaged files raises (tensorstore and Orbax raise ValueError for undecodable
# data, JSON metadata raises ValueError, a missing file FileNotFoundError).
_CORRUPTION = (ValueError, KeyError, EOFError, FileNotFoundError, zlib.error)
# tensorstore raises ValueError for every failure, its status code first: these say the storage
# could not be read now (permissions, an outage, memory, time), not that the files are damaged.
_NOT_DAMAGE = ('PERMISSION_DENIED', 'UNAVAILABLE', 'RESOURCE_EXHAUSTED', 'DEADLINE_EXCEEDED',
               'CANCELLED', 'ABORTED', 'UNAUTHENTICATED')
# ... and where the operating system failed a read, its errno (EIO comes as UNKNOWN, ENODEV as
# NOT_FOUND): a failure of the storage, unless the file is not there (ENOENT).
_OS_ERROR = re.compile(r"os_error_code='?(\d+)")


def is_corruption(error: BaseException) -> bool:
  """Whether a restore failed on the files themselves (not memory, I/O, access or a library)."""
  while type(error) is Exception and error.__cause__ is not None:  # Orbax's wrap of a read
    error = error.__cause__
  message = str(error)
  os_error = _OS_ERROR.search(message)
  if os_error and int(os_error.group(1)) != errno.ENOENT:
    return False
  return isinstance(error, _CORRUPTION) and not message.startswith(_NOT_DAMAGE)


@jax.jit
def _array_sums(arrays):
  """Per array, a position-weighted sum of its bits as 32-bit words: odd weights, so any one
  flipped bit changes it; integer sums, so the value does not depend on the sharding."""
  def words(x):
    if x.dtype == jnp.bool_:
      x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 8:
      x = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif size in (1, 2, 4):
      x = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size])
    flat = x.astype(jnp.uint32).reshape(-1)
    return jnp.sum(flat * (2 * jnp.arange(flat.size, dtype=jnp.uint32) + 1), dtype=jnp.uint32)
  return jnp.stack([words(x) for x in arrays])


def checksum(tree) -> int:
  """A checksum of every leaf of a run state (device arrays summed on their devices)."""
  leaves = jax.tree.leaves(tree)
  on_device = [x for x in leaves if isinstance(x, jax.Array)]
  device_sums = iter(sharding.to_host(_array_sums(on_device)) if on_device else [])
  total = 0
  for leaf in leaves:
    value = (int(next(device_sums)) if isinstance(leaf, jax.Array)
             else zlib.crc32(np.ascontiguousarray(leaf).tobytes()))
    total = (total * 1_000_003 + value) % (1 << 61)
  return total


def _check_directory(directory: str) -> None:
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise FileExistsError(f'{directory} is a file, not a checkpoint directory: move it away (a '
                          f'run keeps its checkpoints there)')


def corrupt_directory(directory: str) -> str:
  """Where the corrupt checkpoints of `directory` are moved (checkpoints/ ->
  checkpoints_corrupt/)."""
  return directory.rstrip(os.sep) + '_corrupt'


def saved_steps(directory: str) -> list[int]:
  """The finished checkpoints' steps under `directory`, read without creating anything."""
  directory = os.path.abspath(directory)
  _check_directory(directory)
  if not os.path.isdir(directory):
    return []
  return sorted(m.step for m in ocp.path.step.standard_name_format().find_all(directory))


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int = 0, mesh=None,
               shard_params: bool = False):
    """Keeps the newest `max_to_keep` steps (0: all). `mesh`: where device arrays are restored
    (default: a mesh of every device present); `shard_params`: split over its data axis too."""
    self.directory = os.path.abspath(directory)
    _check_directory(self.directory)
    self.mesh = mesh if mesh is not None else sharding.make_mesh()
    self.shard_params = shard_params
    self.handler = ocp.StandardCheckpointHandler()
    self.reader = ocp.PyTreeCheckpointHandler()  # (reads a part of a tree alone too)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None, create=True),
        item_handlers=self.handler)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, tree: dict) -> None:
    tree = {**tree, CHECKSUM: {part: np.asarray(checksum(value), np.int64)
                               for part, value in tree.items()}}
    self.manager.save(step, args=ocp.args.StandardSave(tree))

  def restore(self, step: int, parts: tuple[str, ...] | None = None) -> dict:
    """The tree saved at `step` (with `parts`, only those of its keys: the others are not
    read), checked against its checksums. Every process calls it and learns the same outcome:
    the tree, or an error of the same kind (corrupt or not)."""
    _drop_failed_read_reports()
    try:
      tree, error = self._read(step, parts), None
    except Exception as e:  # classified below, the same way on every process
      tree, error = None, e
      if jax.process_count() > 1:  # (the others learn only that it failed here)
        logging.warning('checkpoint %d could not be read on process %d: %s: %s', step,
                        jax.process_index(), type(e).__name__, e)
    status = 0 if error is None else 1 if is_corruption(error) else 2
    worst = sharding.worst(status)
    if worst == 2 and status != 2:
      raise RuntimeError(f'checkpoint {step} could not be restored on another process (its '
                         f'log says why)')
    if status == 2 or isinstance(error, CorruptCheckpointError):
      raise error
    if worst:
      why = (f'{type(error).__name__}: {str(error)[:300]}' if error
             else 'on another process: its log says why')
      raise CorruptCheckpointError(f'checkpoint {step}: its files could not be read ({why})'
                                   ) from error
    saved = tree.pop(CHECKSUM, None)  # (checkpoints of earlier versions have none)
    if isinstance(saved, dict):
      damaged = [part for part in tree if checksum(tree[part]) != int(saved[part])]
    else:  # one checksum of the whole tree (0.9.5 and before)
      damaged = [] if saved is None or checksum(tree) == int(saved) else sorted(tree)
    if damaged:
      raise CorruptCheckpointError(
          f'checkpoint {step}: its {", ".join(damaged)} '
          + ('does not match the checksum saved with it' if len(damaged) == 1 else
             'do not match the checksums saved with them'))
    return tree if parts is None else {part: tree[part] for part in parts}

  def _read(self, step: int, parts: tuple[str, ...] | None) -> dict:
    """The tree saved at `step` (its `parts` and their checksums, where each part has its
    own), as this process reads it. Through a handler, not the manager: the manager's restore
    ends in a barrier that a process whose files fail never reaches, so the others would wait
    there for ever."""
    def target(path, meta):
      if meta.sharding is None:  # saved from a host (numpy) array
        return np.empty(meta.shape, meta.dtype)
      keys = [getattr(k, 'key', None) for k in path[:2]]
      where = (sharding.stacked_leaf(self.mesh, tuple(meta.shape), self.shard_params)
               if keys[0] == 'learner' and keys[-1] in MEMBER_STACKS
               else sharding.replicated(self.mesh))
      return jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=where)

    item = epath.Path(self.directory) / str(step) / ITEM
    try:
      metadata = self.handler.metadata(item)
    except FileNotFoundError as e:
      raise CorruptCheckpointError(f'checkpoint {step}: its metadata is missing') from e
    saved = dict(metadata.tree)
    if parts is not None:
      missing = set(parts) - set(saved)
      if missing:  # (a LookupError: not a sign of damage)
        raise LookupError(f'checkpoint {step} holds no {sorted(missing)}: it holds '
                          f'{sorted(set(saved) - {CHECKSUM})}')
      if isinstance(saved.get(CHECKSUM), dict):  # else the whole tree, to check its checksum
        saved = {**{part: saved[part] for part in parts},
                 CHECKSUM: {part: saved[CHECKSUM][part] for part in parts}}
    abstract = jax.tree_util.tree_map_with_path(target, saved)
    return dict(self.reader.restore(item, args=ocp.args.PyTreeRestore(
        abstract, ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True)))

  def restore_latest(self):
    """(step, tree) of the newest checkpoint that restores, or (0, None) if there is none."""
    for step in reversed(self.steps()):
      try:
        return step, self.restore(step)
      except Exception as error:  # the same kind on every process (see `restore`)
        if not is_corruption(error):
          raise
        shown = f'{type(error).__name__}: {error}'

      def move_aside():  # by process 0, for all
        if not sharding.is_main_process():
          return
        aside = self._move_aside(step)
        logging.warning('checkpoint %d is corrupt (%s); moved it to %s and falling back to '
                        'the one before it', step, shown, aside)
        before = [kept for kept in self.steps() if kept < step]
        print(f'WARNING: checkpoint {step} is corrupt ({shown[:200]}); kept it at {aside} and '
              + (f'falling back to checkpoint {before[-1]}.' if before else
                 'no checkpoint is left before it.'), flush=True)
      # (which also waits until it is done: the others read the directory next)
      sharding.on_every_process(f'moving the corrupt checkpoint {step} aside', move_aside)
      self.manager.reload()
    return 0, None

  def _move_aside(self, step: int) -> str:
    corrupt_dir = corrupt_directory(self.directory)
    os.makedirs(corrupt_dir, exist_ok=True)
    target = os.path.join(corrupt_dir, str(step))
    suffix = 0
    while os.path.exists(target):
      suffix += 1
      target = os.path.join(corrupt_dir, f'{step}.{suffix}')
    shutil.move(os.path.join(self.directory, str(step)), target)
    return target

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Waits for the pending write (raising its error, if it failed), then stops the
    manager's threads in any case, so a failed write never leaves the process hanging."""
    try:
      self.manager.wait_until_finished()
    finally:
      self.manager.close()
