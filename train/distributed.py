"""Multi-process start-up on JAX's own distributed runtime (TPU pods, SLURM, several GPU hosts)."""

from __future__ import annotations

import jax
from absl import logging


def cluster_detected() -> bool:
  """Whether JAX recognises a multi-process environment (TPU pod, SLURM, Open MPI, k8s)."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access
  except Exception:  # a JAX without this module: explicit flags still work
    return False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_seconds: int = 100,
               initialization_timeout_seconds: int = 300) -> bool:
  """Starts jax.distributed when asked (explicit address) or when a cluster is detected.

  Returns whether it was started. Single-process runs do nothing and pay nothing. The heartbeat
  timeout bounds how long survivors wait when a peer dies: the coordination service then
  terminates every remaining process with an error instead of letting them hang.
  """
  explicit = coordinator_address is not None
  if explicit and (num_processes is None or process_id is None):
    raise ValueError("--coordinator_address needs --num_processes and --process_id too "
                     "(e.g. --coordinator_address=10.0.0.1:1234 --num_processes=2 "
                     "--process_id=0 on the first host).")
  if not explicit and not cluster_detected():
    return False
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_seconds,
      initialization_timeout=initialization_timeout_seconds)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
