"""Orbax checkpoints that survive corruption: fall back to the newest step that restores."""

from __future__ import annotations

import time
from typing import Any

import jax
from absl import logging
from etils import epath
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """No checkpoint in the directory could be restored."""


class Checkpointer:
  """CheckpointManager over `<workdir>/checkpoints` saving the train state plus JSON metadata."""

  def __init__(self, workdir: epath.Path, every_steps: int, keep: int,
               asynchronous: bool = True):
    self.directory = workdir / "checkpoints"
    self.quarantine = workdir / "checkpoints_corrupt"
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps, max_to_keep=keep, create=True,
            cleanup_tmp_directories=True,  # half-written saves of a killed run
            enable_async_checkpointing=asynchronous),
    )

  def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = False) -> bool:
    """Saves if the interval (or force) says so; returns whether a save started."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def latest_step(self) -> int | None:
    """The newest step on disk, restorable or not."""
    return self.manager.latest_step()

  def restore(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """The newest restorable (state, meta); None if there is no checkpoint at all.

    Orbax restores whatever `latest_step()` names, corrupt or not; a step that fails to
    restore is moved aside to `checkpoints_corrupt/` (never deleted) and the previous one is
    tried, so a run killed mid-write or a damaged disk costs only the steps since then.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      except Exception as e:  # orbax raises many types (ValueError, FileNotFoundError, ...)
        logging.warning("Checkpoint step %d in %s cannot be restored (%s: %s); moving it to "
                        "%s and falling back to the previous step.", step, self.directory,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "", self.quarantine)
        self._move_aside(step)
        continue
      return restored.state, dict(restored.meta)
    if steps:
      raise CheckpointError(
          f"None of the checkpoints {steps} in {self.directory} could be restored; they were "
          f"moved to {self.quarantine}. Start a fresh run in a new --workdir, or restore a "
          f"backup of the checkpoints into {self.directory}.")
    return None

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      self.quarantine.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(self.quarantine / f"{step}.{int(time.time())}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"quarantine_{step}")
    self.manager.reload()

  def wait(self) -> None:
    """Blocks until asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self.manager.close()
