"""Multi-process start-up on JAX's own distributed runtime (TPU pods, SLURM, several GPU hosts)."""

from __future__ import annotations

import jax
import numpy as np
from absl import logging

from train import errors

MODES = ("auto", "on", "off")


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               heartbeat_timeout_seconds: int = 100,
               initialization_timeout_seconds: int = 300) -> bool:
  """Starts jax.distributed unless `mode` is 'off'; returns whether it runs.

  'auto' uses JAX's public cluster auto-detection (TPU pods, SLURM, Open MPI, Kubernetes, or
  the JAX_COORDINATOR_ADDRESS environment) and runs as one process where it finds none; 'on'
  requires a cluster or explicit flags. The heartbeat timeout bounds how long survivors wait
  when a peer dies: the coordination service then stops every remaining process with an error
  instead of letting them hang. Starting it also installs JAX's preemption service, which owns
  SIGTERM from then on (see train.preemption).
  """
  if mode not in MODES:
    raise errors.ConfigError(f"--distributed={mode!r}: must be one of {', '.join(MODES)}.")
  if mode == "off":
    return False
  explicit = coordinator_address is not None
  if explicit and (num_processes is None or process_id is None):
    raise errors.ConfigError(
        "--coordinator_address needs --num_processes and --process_id too (e.g. "
        "--coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0 on the first "
        "host).")
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        initialization_timeout=initialization_timeout_seconds)
  except ValueError as e:
    # JAX's auto-detection found no cluster: it asks for a coordinator address.
    if explicit or "coordinator_address" not in str(e):
      raise
    if mode == "on":
      raise errors.ConfigError(
          "--distributed=on, but no cluster was detected: pass --coordinator_address, "
          "--num_processes and --process_id.") from e
    return False
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing to wait for alone)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def from_process_0(value: int) -> int:
  """Process 0's `value` (an int32) on every process: what process 0 alone could decide."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
