"""train.host_memory: a train step's temporary buffer is reused, not faulted in at every step."""

import ast
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.abspath(os.path.dirname(__file__)))

# A small real train step (BC net, 3 layers per block, batch 32; ~110 MiB of temporaries):
# minor page faults of each of 10 steps, after `keep_freed_memory()` or not.
_PROBE = textwrap.dedent("""
    import json, os, resource, sys
    sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
    if sys.argv[1] == "plain":  # train_step applies it on import; undo by not importing it first
      sys.modules["train.host_memory"] = type(sys)("train.host_memory")
      sys.modules["train.host_memory"].keep_freed_memory = lambda: False
    import jax
    import train_step
    b = train_step.build("densenet_bc_100", 32, memory_efficient=True, block_config=(3, 3, 3))
    step = b.step.lower(b.state, b.data).compile()
    state, faults = b.state, []
    for _ in range(10):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      state, _ = jax.block_until_ready(step(state, b.data))
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    temp = step.memory_analysis().temp_size_in_bytes / resource.getpagesize()
    print(json.dumps({"temp_pages": temp, "faults": faults}))
    """)


def _faults(mode: str) -> tuple[float, list[int]]:
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=ROOT, check=True, text=True,
                       capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                       timeout=600)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  return result["temp_pages"], sorted(result["faults"][2:])


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_step_temporaries_are_reused_instead_of_faulted_in_every_step():
  temp, plain = _faults("plain")
  assert temp > 8192, temp  # > 32 MiB: above glibc's largest mmap threshold
  # Without it, each step faults the whole temporary buffer in again (the cost it removes).
  assert plain[len(plain) // 2] > 0.9 * temp, plain
  _, kept = _faults("keep")
  # Medians: the odd step may still find its block split and fault it in once.
  assert kept[len(kept) // 2] < 0.02 * temp, kept


@pytest.mark.parametrize("path", ["train/main.py", "benchmarks/train_step.py"])
def test_trainer_and_step_benchmark_apply_it_before_anything_starts_threads(path):
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    body = ast.parse(f.read()).body
  calls = [i for i, node in enumerate(body) if "host_memory.keep_freed_memory()" in ast.unparse(node)]
  heavy = [i for i, node in enumerate(body) if isinstance(node, (ast.Import, ast.ImportFrom))
           and any(n in ast.unparse(node) for n in ("jax", "absl", "tensorflow", "flax"))]
  assert calls and all(calls[0] < i for i in heavy), (path, calls, heavy)
