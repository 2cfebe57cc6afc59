"""Ctrl-C: the first checkpoints the step reached and exits 130 with one line; a second stops at
once without invalidating the newest committed checkpoint; neither prints a traceback."""

import json
import os
import pathlib
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from train import preemption
from train_test import REPO, checkpoint_steps, digits_command, saved_params


def command(workdir, data_dir, *extra):
  return digits_command(workdir, data_dir, "--config.model_overrides.depth=10",
                        "--config.num_train_steps=5000", "--config.log_every_steps=1",
                        "--config.async_checkpoints=True", *extra)


def start(cmd):
  # A session of its own: the test sends Ctrl-C to the whole process group, as a terminal does.
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)


def train_steps(workdir):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(l)["step"] for l in path.read_text().splitlines()
          if l.strip() and json.loads(l)["kind"] == "train"]


def wait_until(predicate, proc, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, "timed out"
    time.sleep(0.02)


def finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


@pytest.mark.slow
def test_ctrl_c_mid_run_checkpoints_the_step_reached_and_exits_130(tmp_path):
  workdir = tmp_path / "run"
  proc = start(command(workdir, tmp_path / "tfds", "--config.checkpoint_every_steps=1000"))
  wait_until(lambda: len(train_steps(workdir)) >= 5, proc)
  os.killpg(proc.pid, signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  reached = max(train_steps(workdir))
  # One line (and no tf.data KeyboardInterrupt traceback); the step reached is saved and complete.
  assert err.strip() == f"Checkpointed step {reached} after Ctrl-C; rerun the same command to resume."
  assert checkpoint_steps(workdir) == [reached]
  assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
  assert finite(saved_params(workdir, reached))


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_and_the_newest_checkpoint_stays_valid(tmp_path):
  workdir = tmp_path / "run"
  proc = start(command(workdir, tmp_path / "tfds", "--config.checkpoint_every_steps=3"))
  wait_until(lambda: (workdir / "checkpoints" / "3").exists() and len(train_steps(workdir)) >= 5,
             proc)
  os.killpg(proc.pid, signal.SIGINT)  # starts the save of the step reached...
  time.sleep(0.01)
  os.killpg(proc.pid, signal.SIGINT)  # ...which the second one does not wait for
  sent = time.time()
  _, err = proc.communicate(timeout=60)
  assert time.time() - sent < 15
  assert proc.returncode == 130, err[-3000:]
  assert len(err.strip().splitlines()) == 1, err[-3000:]
  assert err.startswith("Stopped at once by a second Ctrl-C") and "Traceback" not in err
  newest = checkpoint_steps(workdir)[-1]
  assert newest >= 3 and finite(saved_params(workdir, newest))


def test_ctrl_c_during_start_up_says_nothing_was_saved(tmp_path):
  proc = start(command(tmp_path / "run", tmp_path / "tfds"))
  assert proc.stdout.readline().startswith("Writing scikit-learn's")  # start-up, not training
  os.killpg(proc.pid, signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert err.strip() == ("Stopped by Ctrl-C before the first training step: nothing was saved. "
                         "Rerun the same command to start again.")


def test_ctrl_c_while_importing_is_one_line(tmp_path):
  proc = start(command(tmp_path / "run", tmp_path / "tfds"))
  time.sleep(1.0)  # python, jax and tensorflow are still importing
  os.killpg(proc.pid, signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert len(err.strip().splitlines()) == 1 and err.startswith("Stopped by Ctrl-C"), err[-3000:]


def test_ctrl_c_is_a_preemption_notice_once_training():
  notice = preemption.Preemption()
  try:
    with pytest.raises(preemption.Interrupted, match="before the first training step"):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.5)  # the handler runs here
    assert notice.interrupted and notice.requested
  finally:
    notice.close()
  notice = preemption.Preemption()
  try:
    notice.start_training()
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    assert notice.reached(7) and notice.interrupted  # no KeyboardInterrupt: the loop decides
  finally:
    notice.close()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
