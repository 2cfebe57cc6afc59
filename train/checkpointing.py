"""Orbax checkpoints that are verified, never poisoned, and told apart from a changed config.

Every checkpoint carries, in its JSON metadata, the run's identity (what determines the shape
of the state: model, overrides, dtype, optimizer structure, dataset) and a record of every
array (shape, dtype, blake2b digest of its bytes). On restore:

- a checkpoint of a differently configured run is refused with the differing fields named,
  and nothing is moved (IncompatibleCheckpointError);
- a step whose files cannot be read, or whose arrays do not match their digests (a flipped
  bit restores without an error in orbax), is moved to `checkpoints_corrupt/` and the previous
  step is tried; a workdir whose every checkpoint was moved aside refuses to start over;
- nothing non-finite is ever saved (DivergedError instead), so the newest step is always a
  state training can continue from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from train import distributed, errors

CheckpointError = errors.CheckpointError


def host_value(x: Any) -> np.ndarray:
  """A replicated array's value on this host (works across processes)."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def array_record(state: Any) -> tuple[dict[str, list[Any]], list[str]]:
  """{path: [shape, dtype, digest]} of every leaf, and the paths holding non-finite values."""
  record, non_finite = {}, []
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    value = host_value(leaf)
    key = jax.tree_util.keystr(path)
    digest = hashlib.blake2b(value.tobytes(), digest_size=16).hexdigest()
    record[key] = [list(value.shape), str(value.dtype), digest]
    if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
      non_finite.append(key)
  return record, non_finite


def checkpoint_bytes(abstract_state: Any) -> int:
  """About how many bytes one checkpoint of `abstract_state` (shapes and dtypes, e.g. from
  jax.eval_shape) takes on disk: the arrays uncompressed plus orbax's per-array metadata and
  files (measured on the digits model: 166 KB of arrays in 78 leaves took 267 KB)."""
  leaves = jax.tree_util.tree_leaves(abstract_state)
  data = 0
  for leaf in leaves:
    try:
      itemsize = np.dtype(leaf.dtype).itemsize
    except TypeError:  # typed PRNG keys: two uint32 words
      itemsize = 8
    data += math.prod(leaf.shape) * itemsize
  return int(data * 1.1) + 1536 * len(leaves) + (64 << 10)


def check_free_space(workdir: epath.Path, abstract_state: Any) -> None:
  """Raises DiskFullError unless the disk holding a local `workdir` has room for one more
  checkpoint of `abstract_state`: a rerun on a full disk then fails before compiling, not at
  its first save. Every process calls it; process 0 decides (the workdir is shared)."""
  needed = checkpoint_bytes(abstract_state)
  free = -1
  if jax.process_index() == 0 and "://" not in str(workdir):
    try:
      free = shutil.disk_usage(workdir).free
    except OSError:
      free = -1  # cannot tell: let the first save find out
  if jax.process_count() > 1:  # in KiB: int32 without jax_enable_x64
    kib = distributed.from_process_0(min(free >> 10, 2**31 - 1) if free >= 0 else -1)
    free = kib << 10 if kib >= 0 else -1
  if 0 <= free < needed:
    raise errors.DiskFullError(
        f"The disk holding --workdir={workdir} has {free:,} bytes free, but a checkpoint of "
        f"this run needs about {needed:,}. Free space (or choose another --workdir) and rerun "
        f"the same command: it resumes from the newest complete checkpoint.")


def json_round_trip(value: Any) -> Any:
  """`value` as it reads back from a checkpoint's JSON (tuples become lists)."""
  return json.loads(json.dumps(value, default=str))


class Checkpointer:
  """A CheckpointManager over `<workdir>/checkpoints`: state plus verified JSON metadata."""

  def __init__(self, workdir: epath.Path, every_steps: int, keep: int,
               asynchronous: bool = True, read_only: bool = False):
    self.directory = workdir / "checkpoints"
    self.quarantine = workdir / "checkpoints_corrupt"
    for folder in (self.directory, self.quarantine):
      # orbax would only fail at the first save, after compiling and training.
      if folder.exists() and not folder.is_dir():
        raise errors.WorkdirError(
            f"{folder} is a file, but the trainer keeps its checkpoints in a directory of that "
            f"name. Move the file away (or choose another --workdir) and rerun.")
    self.every_steps = every_steps
    self.read_only = read_only
    # Read-only: no interval and no deletions (orbax warns about each option it overrides), and
    # its notice that the directory is read-only is what was asked for.
    with _absl_warnings_without("Given directory is read only"):
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=None if read_only else keep, create=not read_only,
              save_interval_steps=0 if read_only else 1, read_only=read_only,
              cleanup_tmp_directories=not read_only,  # half-written saves of a killed run
              enable_async_checkpointing=asynchronous),
      )

  def due(self, step: int) -> bool:
    """Whether the save interval asks for a checkpoint at `step`."""
    return step % self.every_steps == 0

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves `state` at `step` unless that step is on disk; refuses a non-finite state."""
    if self.manager.latest_step() == step:
      return
    record, non_finite = array_record(state)
    if non_finite:
      raise errors.DivergedError(
          f"Training diverged: the state at step {step} holds non-finite values (e.g. "
          f"{non_finite[0]}), so it was not saved; {newest_text(self.latest_step())}. "
          f"{errors.DIVERGENCE_FIX}")
    meta = {**meta, "arrays": record, "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def latest_step(self) -> int | None:
    """The newest step on disk (or being written)."""
    return self.manager.latest_step()

  def restore(self, abstract_state: Any, identity: dict[str, Any]
              ) -> tuple[Any, dict[str, Any]] | None:
    """The newest intact (state, meta) of this run; None if the workdir has no checkpoint.

    A writable checkpointer first checks that one more checkpoint fits on the disk: this is
    where a run first knows its state's size, before anything is compiled.
    """
    if not self.read_only:
      check_free_space(self.directory.parent, abstract_state)
    identity = json_round_trip(identity)
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      try:
        meta = dict(self.manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
      except Exception as e:  # orbax raises many types for unreadable files
        self._corrupt(step, f"its metadata cannot be read ({type(e).__name__}: {_first_line(e)})")
        continue
      _check_compatible(step, meta, identity, abstract_state, self.directory)
      try:
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state))).state
      except Exception as e:  # same structure and shapes, so a read failure is damage
        self._corrupt(step, f"its arrays cannot be read ({type(e).__name__}: {_first_line(e)})")
        continue
      if "arrays" in meta:
        record, _ = array_record(state)
        damaged = [k for k, v in record.items() if meta["arrays"].get(k) != v]
        if damaged:
          self._corrupt(step, f"{len(damaged)} arrays do not match their saved digests "
                              f"(e.g. {damaged[0]})")
          continue
      return state, meta
    if steps or self._quarantined():
      raise CheckpointError(
          f"No intact checkpoint is left in {self.directory}; the damaged ones are in "
          f"{self.quarantine}. Restore a backup into {self.directory}, or start over in a new "
          f"--workdir (or move {self.quarantine} away to start over here).")
    return None

  def _quarantined(self) -> bool:
    return self.quarantine.exists() and any(self.quarantine.iterdir())

  def _corrupt(self, step: int, why: str) -> None:
    if self.read_only:
      logging.warning("Checkpoint step %d in %s is damaged: %s; trying the previous step.",
                      step, self.directory, why)
      return
    logging.warning("Checkpoint step %d in %s is damaged: %s; moving it to %s and falling back "
                    "to the previous step.", step, self.directory, why, self.quarantine)
    if jax.process_index() == 0:
      self.quarantine.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(self.quarantine / f"{step}.{int(time.time())}")
    distributed.barrier(f"quarantine_{step}")
    self.manager.reload()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self.manager.close()


@contextlib.contextmanager
def _absl_warnings_without(prefix: str) -> Iterator[None]:
  """Drops absl log lines that start with `prefix` while the block runs."""
  keep = lambda record: not str(record.msg).startswith(prefix)
  logger = logging.get_absl_logger()
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


def newest_text(step: int | None) -> str:
  """How a divergence message names the checkpoint a rerun resumes from."""
  if step is None:
    return "no checkpoint had been written yet, so a rerun starts from scratch"
  return f"the newest checkpoint (step {step}) is finite and kept: a rerun resumes from it"


def _first_line(e: BaseException) -> str:
  return str(e).splitlines()[0] if str(e) else ""


def _check_compatible(step: int, meta: dict[str, Any], identity: dict[str, Any],
                      abstract_state: Any, directory: epath.Path) -> None:
  """Raises IncompatibleCheckpointError if the step was written by a differently configured run."""
  saved = meta.get("identity", {})
  differ = sorted(k for k in identity.keys() | saved.keys() if saved.get(k) != identity.get(k))
  if "identity" in meta and differ:
    lines = [f"  {k}: checkpoint {saved.get(k)!r}, this run {identity.get(k)!r}" for k in differ]
    raise errors.IncompatibleCheckpointError(
        f"The checkpoints in {directory} (step {step}) belong to a differently configured run:\n"
        + "\n".join(lines) + "\nNothing was changed. Rerun with the original values to resume "
        "that run, or choose a new --workdir to train with these settings.")
  if "arrays" in meta:
    want = {jax.tree_util.keystr(p): [list(a.shape), str(np.dtype(a.dtype))]
            for p, a in jax.tree_util.tree_leaves_with_path(abstract_state)}
    have = {k: v[:2] for k, v in meta["arrays"].items()}
    if want != have:
      different = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
      raise errors.IncompatibleCheckpointError(
          f"The checkpoints in {directory} (step {step}) hold a state of a different structure "
          f"than this run's model and optimizer (e.g. {different[0]}: checkpoint "
          f"{have.get(different[0])}, this run {want.get(different[0])}). Nothing was changed. "
          f"Rerun with the original config to resume, or choose a new --workdir.")
