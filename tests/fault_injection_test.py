"""kill -9 at random moments, mid-save included: the finished run equals an uninterrupted one, bit for bit."""

import pathlib
import random
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from train_test import REPO, read_metrics, saved_params

pytestmark = pytest.mark.slow
STEPS = 30


def command(workdir, data_dir):
  return [sys.executable, "-m", "train.main", "--config", "configs/digits_bc.py",
          "--workdir", str(workdir), f"--config.data_dir={data_dir}",
          "--config.model_overrides.depth=10", "--config.train_split=train[:640]",
          f"--config.num_train_steps={STEPS}", "--config.checkpoint_every_steps=2",
          "--config.log_every_steps=1", "--config.async_checkpoints=True"]


def last_step(workdir):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return max((l["step"] for l in read_metrics(workdir) if l["kind"] == "train"), default=0) if (
      path.exists()) else 0


def saving(workdir):
  return any(".orbax-checkpoint-tmp" in p.name
             for p in (pathlib.Path(workdir) / "checkpoints").glob("*"))


def test_kill_9_at_random_moments_ends_bitwise_equal(tmp_path):
  data_dir = tmp_path / "tfds"
  straight = tmp_path / "straight"
  subprocess.run(command(straight, data_dir), cwd=REPO, check=True, capture_output=True,
                 timeout=600)

  faulted, rng = tmp_path / "faulted", random.Random(0)
  kinds = ["mid-save", "step", "mid-save", "step", "start-up"]
  kills = []
  for kind in kinds:
    proc = subprocess.Popen(command(faulted, data_dir), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seen = last_step(faulted)
    target, kill_at = seen + rng.randint(1, 4), time.time() + rng.uniform(1, 8)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
      if kind == "start-up" and time.time() > kill_at:
        break
      if kind == "step" and last_step(faulted) >= target:
        time.sleep(rng.uniform(0, 0.3))
        break
      if kind == "mid-save" and last_step(faulted) > seen and saving(faulted):
        break
      time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed"
    kills.append((kind, last_step(faulted), saving(faulted)))
    proc.kill()
    proc.wait()
  print("kills (kind, logged train lines, a save in flight):", kills)
  assert len(kills) >= 5 and sum(in_flight for _, _, in_flight in kills) >= 1
  subprocess.run(command(faulted, data_dir), cwd=REPO, check=True, capture_output=True,
                 timeout=600)

  a, b = saved_params(straight, STEPS), saved_params(faulted, STEPS)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  final = lambda w: [l for l in read_metrics(w) if l["kind"] == "eval"][-1]
  assert final(straight) == final(faulted)
