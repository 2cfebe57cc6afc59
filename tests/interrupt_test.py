"""Ctrl-C: the first checkpoints the step reached and exits 130 with one line; a second stops at
once without invalidating the newest committed checkpoint; neither prints a traceback. SIGHUP
(a closed terminal) and SIGQUIT (after a dump of every thread's stack) checkpoint as SIGTERM
does."""

import fcntl
import io
import json
import os
import pathlib
import pty
import signal
import subprocess
import sys
import termios
import threading
import time

import jax
import numpy as np
import pytest

import multihost_test
from multihost_launch import launch, trainer, wait_all
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
    assert proc.poll() is None, (proc.communicate()[1] or "")[-3000:]
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


def newest_train_step(workdir):
  return max(train_steps(workdir))


def assert_checkpointed_and_resumes(workdir, data_dir, reached):
  """The step reached is the only, complete checkpoint, and the same command resumes from it."""
  assert checkpoint_steps(workdir) == [reached]
  assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
  assert finite(saved_params(workdir, reached))
  rerun = subprocess.run(command(workdir, data_dir, f"--config.num_train_steps={reached + 2}"),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"Resumed from step {reached} of {reached + 2}" in rerun.stdout
  assert train_steps(workdir)[-2:] == [reached + 1, reached + 2]


def _controlling_terminal():
  os.setsid()
  fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.slow
def test_closing_the_terminal_checkpoints_the_step_reached_and_the_rerun_resumes(tmp_path):
  workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
  master, terminal = pty.openpty()
  proc = subprocess.Popen(command(workdir, data_dir, "--config.checkpoint_every_steps=1000"),
                          cwd=REPO, stdin=terminal, stdout=terminal, stderr=terminal,
                          preexec_fn=_controlling_terminal)
  os.close(terminal)
  shown = []  # what the terminal showed (read, or the run blocks on a full terminal)
  reader = threading.Thread(target=_drain, args=(master, shown), daemon=True)
  reader.start()
  wait_until(lambda: len(train_steps(workdir)) >= 5, proc)
  os.close(master)  # the terminal (or SSH session) closes: the kernel sends SIGHUP
  assert proc.wait(timeout=120) == 0, b"".join(shown)[-3000:]
  assert_checkpointed_and_resumes(workdir, data_dir, newest_train_step(workdir))


def _drain(fd, into):
  while True:
    try:
      data = os.read(fd, 4096)
    except OSError:
      return
    if not data:
      return
    into.append(data)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGHUP", "SIGQUIT"])
def test_sighup_and_sigquit_checkpoint_the_step_reached_in_one_line(tmp_path, name):
  signum = getattr(signal, name)
  workdir = tmp_path / "run"
  proc = start(command(workdir, tmp_path / "tfds", "--config.checkpoint_every_steps=1000"))
  wait_until(lambda: len(train_steps(workdir)) >= 5, proc)
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  reached = newest_train_step(workdir)
  assert f"Checkpointed step {reached} after {name}" in out
  assert "Traceback (most recent call last)" not in err
  if signum == signal.SIGQUIT:  # every thread's stack, the main thread's included
    assert "most recent call first" in err and "Current thread" in err, err[-3000:]
  assert checkpoint_steps(workdir) == [reached]


@pytest.mark.parametrize("name", ["SIGHUP", "SIGQUIT"])
def test_sighup_and_sigquit_during_start_up_exit_128_plus_the_signal(tmp_path, name):
  signum = getattr(signal, name)
  proc = start(command(tmp_path / "run", tmp_path / "tfds"))
  assert proc.stdout.readline().startswith("Writing scikit-learn's")  # start-up, not training
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signum, err[-3000:]
  assert err.strip().splitlines()[-1] == (
      f"error: {name} during start-up, before the first step: nothing was saved. Rerun the "
      f"same command to start again.")
  assert "Traceback (most recent call last)" not in err


def test_sigquit_dumps_every_thread_then_asks_for_a_checkpoint(capfd, monkeypatch):
  # sys.stderr without a file descriptor (as under pytest's capsys): the dump goes to fd 2.
  monkeypatch.setattr(sys, "stderr", io.StringIO())
  notice = preemption.Preemption()
  try:
    notice.start_training()
    os.kill(os.getpid(), signal.SIGQUIT)
    time.sleep(0.1)
    assert notice.reached(3) and notice.notice == signal.SIGQUIT
  finally:
    notice.close()
  assert "Current thread" in capfd.readouterr().err
  assert signal.getsignal(signal.SIGQUIT) is signal.SIG_DFL


def test_a_sighup_ignored_by_nohup_stays_ignored():
  previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
  try:
    notice = preemption.Preemption()
    try:
      assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
      os.kill(os.getpid(), signal.SIGHUP)
      time.sleep(0.1)
      assert not notice.requested
    finally:
      notice.close()
  finally:
    signal.signal(signal.SIGHUP, previous)


@pytest.mark.slow
def test_ctrl_c_during_the_final_evaluation_exits_130_after_it(tmp_path):
  workdir = tmp_path / "run"
  # A long final evaluation (every digit, 4 per batch) after 3 steps.
  proc = start(command(workdir, tmp_path / "tfds", "--config.num_train_steps=3",
                       "--config.eval_split=train+test", "--config.eval_batch_size=4"))
  final_save = lambda: (workdir / "checkpoints").exists() and any(
      p.name.startswith("3") for p in (workdir / "checkpoints").iterdir())
  wait_until(final_save, proc)  # after the last step's stop check: the final save has begun
  os.killpg(proc.pid, signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert "Final test accuracy" in out
  assert err.strip() == ("Ctrl-C after the last step: the run is complete, its final "
                         "checkpoint (step 3) and evaluation were written.")
  assert checkpoint_steps(workdir) == [3]
  assert [l for l in (workdir / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]


@pytest.mark.slow
def test_sighup_to_one_process_stops_both_at_one_step(tmp_path):
  workdir = tmp_path / "run"
  common = multihost_test.flags(tmp_path, workdir, "--config.train_split=train[:640]",
                                "--config.num_train_steps=400",
                                "--config.checkpoint_every_steps=1000")
  procs = launch(trainer(common), 2, 2, tmp_path, "first")
  multihost_test.wait_for_train_lines(workdir / "metrics.jsonl", 5)
  procs[1].send_signal(signal.SIGHUP)  # passed on to JAX's preemption service
  assert wait_all(procs, 200) == [0, 0], (tmp_path / "first1.log").read_text()[-3000:]
  logs = [(tmp_path / f"first{i}.log").read_text() for i in range(2)]
  saved = checkpoint_steps(workdir)
  assert len(saved) == 1 and 5 <= saved[0] < 400
  assert f"Checkpointed step {saved[0]} after" in logs[0]
  assert all(f"checkpointed step {saved[0]}" in log for log in logs)  # the same step on both
  assert "Traceback" not in logs[1]
