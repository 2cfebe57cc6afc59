"""Starting several trainer processes on 127.0.0.1: the launch every multi-process test uses."""

import os
import pathlib
import socket
import subprocess
import sys
import time
from typing import Callable

REPO = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now (for the coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def trainer(args: list[str]) -> Callable[[int, list[str]], list[str]]:
  """The `launch` command of `python -m train.main args` (every process gets the same flags)."""
  return lambda i, multi: [sys.executable, "-m", "train.main", *args, *multi]


def launch(cmd: Callable[[int, list[str]], list[str]], processes: int, devices_per_process: int,
           log_dir: pathlib.Path, name: str) -> list[subprocess.Popen]:
  """Starts cmd(process_id, distributed_flags) once per process, each with
  `devices_per_process` CPU devices; output goes to <log_dir>/<name><i>.log."""
  port = free_port()
  env = dict(os.environ, PYTHONPATH=str(REPO),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  procs = []
  for i in range(processes):
    multi = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
              f"--process_id={i}"] if processes > 1 else [])
    log = open(log_dir / f"{name}{i}.log", "w")
    procs.append(subprocess.Popen(cmd(i, multi), cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT))
  return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
  """The exit codes of `procs`, all waited for within `timeout` seconds together."""
  deadline = time.time() + timeout
  return [p.wait(timeout=max(1, deadline - time.time())) for p in procs]
