"""Keras 3 peer on the JAX backend: keras.applications.DenseNet121(weights=None), one SGD step.

Runs itself in a subprocess with KERAS_BACKEND=jax (the backend is fixed at `import keras`),
so it can be called from a process that already imported JAX or TensorFlow.

Same step as the JAX and torch benchmarks: SGD lr 0.1, Nesterov momentum 0.9, weight decay
1e-4 (Keras applies it decoupled, `w -= lr * wd * w`; the same arithmetic cost), sparse
categorical cross-entropy, train-mode BatchNorm, float32; `model.train_on_batch` (a jitted
JAX train step) timed per call after compiling, --steps median.

    python benchmarks/peers_keras.py --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _child(batch: int, steps: int, warmup: int, image: int) -> dict[str, Any]:
  _common.fast_cpu_init()
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert keras.backend.backend() == "jax", keras.backend.backend()
  keras.utils.set_random_seed(0)
  model = keras.applications.DenseNet121(weights=None, input_shape=(image, image, 3),
                                         classes=1000)
  params = int(sum(np.prod(w.shape) for w in model.trainable_weights))
  model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, nesterov=True,
                                               weight_decay=1e-4),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False),
                jit_compile=True)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, image, image, 3)).astype(np.float32)
  y = rng.integers(0, 1000, (batch,)).astype(np.int32)
  load_before = _common.loadavg()
  t0 = time.perf_counter()
  model.train_on_batch(x, y)
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    loss = model.train_on_batch(x, y)
    float(np.asarray(loss))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return {
      "bench": "peer", "peer": "keras", "keras": keras.__version__, "backend": "jax",
      "model": "densenet121", "params": params, "batch": batch, "image": image,
      "mode": "keras_jax_jit", "first_step_s": round(compile_s, 2), "steps": steps,
      **_common.timing(times, batch),
      "load_before": load_before, "load_after": _common.loadavg(),
  }


def measure(batch: int, steps: int, warmup: int, image: int = 224,
            timeout: float = 1800) -> dict[str, Any]:
  """Runs the Keras step in a KERAS_BACKEND=jax subprocess; returns its JSON row."""
  env = dict(os.environ, KERAS_BACKEND="jax")
  cmd = [sys.executable, os.path.abspath(__file__), "--child", "--batch", str(batch),
         "--steps", str(steps), "--warmup", str(warmup), "--image", str(image)]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  rows = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not rows:
    raise RuntimeError(f"keras peer failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(rows[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Measures the Keras peer and prints its JSON row."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--image", type=int, default=224)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    row = _child(args.batch, args.steps, args.warmup, args.image)
  else:
    row = measure(args.batch, args.steps, args.warmup, args.image)
  _common.emit(row)
  return row


if __name__ == "__main__":
  main()
