"""SIGTERM as a request to checkpoint and stop, agreed by every process at the same step."""

from __future__ import annotations

import signal

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preempted(BaseException):
  """SIGTERM arrived before training started: nothing to save, so the run stops at once.

  A BaseException, like KeyboardInterrupt, so that no library's `except Exception` swallows it.
  """


_START_UP = ("SIGTERM during start-up, before the first step: nothing was saved. Rerun the same "
             "command to start again.")


class Preemption:
  """Where the process should stop for a preemption notice (SIGTERM).

  With a distributed runtime, JAX's preemption service owns SIGTERM: the notice reaches every
  process, and `reached_preemption_sync_point` turns True on all of them at the same step (the
  highest step any process has reported, plus one), so their collective save cannot deadlock.
  Without one, a Python handler records the signal: during start-up it stops at once (there is
  nothing to save), inside the loop at the next step boundary.
  """

  def __init__(self):
    self.distributed = jax.distributed.is_initialized()
    self.requested = False
    self.training = False
    self._previous = None
    if not self.distributed:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True
    if not self.training:
      raise Preempted(_START_UP)
    logging.warning("SIGTERM: saving a checkpoint and stopping after this step.")

  def start_training(self) -> None:
    """From now on a SIGTERM checkpoints at the next step boundary instead of stopping."""
    if self.requested:  # the handler's exception can be swallowed (raised inside a __del__)
      raise Preempted(_START_UP)
    self.training = True

  def reached(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step`; call it at every step on every process."""
    if self.distributed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self) -> None:
    """Reinstates the previous SIGTERM handler."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
