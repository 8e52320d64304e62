"""Orbax checkpoints of the whole run state, one per arrival.

The run state is saved as a plain tree. It is restored to the tree the checkpoint's own metadata
describes, so a tree whose shapes changed over the stream (a grown ensemble) restores as saved;
the learner then rebuilds its own structure from it. Device arrays are restored replicated over
the current mesh, whatever the devices that wrote them (a checkpoint written on 8 devices
restores on 1); host arrays (stream, history) come back as numpy arrays. A checkpoint that fails
to restore is moved aside (never deleted) and the one before it is used.
"""
from __future__ import annotations

import os
import shutil

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from alma_jax import sharding


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int = 0, mesh=None):
    """Keeps the newest `max_to_keep` steps (0: all). `mesh`: where device arrays are restored
    (default: a mesh of every device present)."""
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise FileExistsError(f'{self.directory} is a file, not a checkpoint directory: move it '
                            f'away (a run keeps its checkpoints there)')
    self.mesh = mesh if mesh is not None else sharding.make_mesh()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None, create=True),
        item_handlers=ocp.StandardCheckpointHandler())

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, tree) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(tree))

  def restore(self, step: int):
    def target(meta):
      if meta.sharding is None:  # saved from a host (numpy) array
        return np.empty(meta.shape, meta.dtype)
      return jax.ShapeDtypeStruct(meta.shape, meta.dtype,
                                  sharding=sharding.replicated(self.mesh))

    abstract = jax.tree.map(target, self.manager.item_metadata(step).tree)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def restore_latest(self, is_valid=lambda tree: None):
    """(step, tree) of the newest checkpoint that restores, or (0, None) if there is none.

    `is_valid(tree)` may raise ValueError to reject a restored tree as corrupt.
    """
    for step in reversed(self.steps()):
      try:
        tree = self.restore(step)
        is_valid(tree)
        return step, tree
      except Exception as error:  # Any failure to read a step is treated as a corrupt step.
        if sharding.is_main_process():
          aside = self._move_aside(step)
          logging.warning('checkpoint %d could not be restored (%s: %s); moved it to %s and '
                          'falling back to the one before it', step, type(error).__name__,
                          error, aside)
          print(f'WARNING: checkpoint {step} is corrupt ({type(error).__name__}); kept it at '
                f'{aside} and resumed from the previous one.', flush=True)
        sharding.barrier(f'alma_jax.checkpoint.corrupt.{step}')
        self.manager.reload()
    return 0, None

  def _move_aside(self, step: int) -> str:
    corrupt_dir = self.directory + '_corrupt'
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
