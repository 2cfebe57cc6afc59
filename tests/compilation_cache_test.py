"""The compilation cache never stops a run: an unusable directory turns it off in one line, and
a damaged entry, or one holding another program, is replaced by a fresh compile."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import compilation
from train_test import REPO, digits_command

# Two programs whose entries, swapped, decode: JAX 0.12 loaded the other one and failed in
# pxla with `AssertionError: (1, 4)` (four outputs expected, one found).
_PROGRAMS = """
import sys
import jax, jax.numpy as jnp
from train import compilation
compilation.enable_cache(sys.argv[1])
x = jnp.arange(4.0)
four = compilation.compile_step("four", jax.jit(lambda x: (x + 1, x * 2, x.sum(), x - 3)), x)
one = compilation.compile_step("one", jax.jit(lambda x: x * 5), x)
print(float(four(x)[2]), float(one(x)[1]))
"""


def launch(cache):
  """Runs both programs with `cache`; (their results, cache hits, the process)."""
  result = subprocess.run([sys.executable, "-c", _PROGRAMS, str(cache)], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  return lines[-1].split(), sum("loaded from the compilation cache" in l for l in lines), result


def entries(cache):
  """The cache's entries of the two programs, largest (the four-output one) first."""
  found = [p for p in pathlib.Path(cache).iterdir() if p.name.startswith("jit__lambda")]
  assert len(found) == 2, found
  return sorted(found, key=lambda p: p.stat().st_size, reverse=True)


@pytest.fixture
def warm_cache(tmp_path):
  cache = tmp_path / "cache"
  results, hits, _ = launch(cache)
  assert results == ["6.0", "5.0"] and hits == 0
  return cache


@pytest.mark.parametrize("damage", ["swapped", "random bytes", "truncated"])
def test_a_bad_entry_is_replaced_in_one_line_and_the_next_launch_hits(warm_cache, damage):
  four, one = entries(warm_cache)
  if damage == "swapped":  # one program's entry copied over the other's
    one.write_bytes(four.read_bytes())
  elif damage == "random bytes":
    four.write_bytes(np.random.default_rng(0).bytes(four.stat().st_size))
  else:
    four.write_bytes(four.read_bytes()[:len(four.read_bytes()) // 2])
  results, hits, damaged = launch(warm_cache)
  assert results == ["6.0", "5.0"] and hits == 1  # the right programs ran; one was intact
  lines = damaged.stderr.strip().splitlines()
  assert len(lines) == 1 and str(warm_cache) in lines[0] and "replaced" in lines[0], lines
  results, hits, again = launch(warm_cache)  # the entry was rewritten: no line, both hit
  assert results == ["6.0", "5.0"] and hits == 2 and not again.stderr.strip(), again.stderr


def _unusable(tmp_path, kind):
  afile = tmp_path / "afile"
  afile.write_text("not a directory")
  return {"a file": afile, "under a file": afile / "cache",
          "unwritable place": pathlib.Path("/proc/densenet_jax_cache")}[kind]


@pytest.mark.parametrize("kind", ["a file", "under a file", "unwritable place"])
def test_an_unusable_directory_turns_the_cache_off_in_one_line(tmp_path, kind, caplog):
  path = _unusable(tmp_path, kind)
  try:
    assert compilation.enable_cache(str(path)) is None
    assert jax.config.jax_compilation_cache_dir is None
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    assert "Compilation cache off" in warnings[0].getMessage()
    assert float(jax.jit(lambda x: x + 1)(jnp.float32(1))) == 2.0  # compiling still works
  finally:
    compilation.disable_cache()


@pytest.mark.slow
def test_cli_with_a_file_where_the_default_cache_goes_trains_and_says_so_once(tmp_path):
  home = tmp_path / "home"
  (home / ".cache").mkdir(parents=True)
  (home / ".cache" / "densenet_jax").write_text("a file where the cache directory should be")
  result = subprocess.run(
      digits_command(tmp_path / "run", tmp_path / "tfds", "--config.model_overrides.depth=10",
                     "--config.num_train_steps=2"),
      cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, HOME=str(home)))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Final test accuracy" in result.stdout
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "Compilation cache off" in lines[0], result.stderr[-3000:]
  assert str(home / ".cache" / "densenet_jax") in lines[0]
