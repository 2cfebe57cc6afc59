"""Compiling the steps: announced, timed, and kept in JAX's persistent cache across launches.

A relaunch (after a preemption, a crash, or simply the next run of the same config) loads the
compiled train and eval steps from the cache instead of compiling them again; on a TPU pod the
DenseNet-121 step takes minutes of host CPU to compile (`python -m train.plan` says how many).
JAX writes each entry atomically, so processes on one host share a directory safely; each host
of a pod keeps its own (only process 0 writes). One exception: XLA:CPU cannot serialize the
oneDNN custom calls the CPU fast path asks for (densenet_jax.backends; JAX 0.12 reports
`std::bad_alloc`), so on CPU the train step is compiled at every launch and the rest is cached.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Callable

import jax
from jax.experimental.compilation_cache import compilation_cache as cc

_hits = 0
_listening = False


def _count_hits(event: str, **_: Any) -> None:
  global _hits
  if event == "/jax/compilation_cache/cache_hits":
    _hits += 1


def enable_cache(directory: str) -> str | None:
  """Points JAX's persistent compilation cache at `directory` ('' leaves it off); its path."""
  global _listening
  if not directory:
    return None
  path = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(path, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != path:
    cc.set_cache_dir(path)
    cc.reset_cache()  # JAX opens its cache once per process: reopen it at the new path
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the eval step too
  if not _listening:
    jax.monitoring.register_event_listener(_count_hits)
    # The CPU train step cannot be serialized (see above); JAX would say so at every launch.
    warnings.filterwarnings("ignore", message="Error writing persistent compilation cache")
    _listening = True
  return path


def disable_cache() -> None:
  """Turns the persistent cache off again for this process (tests, benchmarks)."""
  cc.set_cache_dir(None)
  cc.reset_cache()


def compile_step(name: str, jitted: Any, *args: Any,
                 say: Callable[[str], None] = print) -> Any:
  """`jitted` compiled for `args`, with one line before and one after (time, cache hit)."""
  say(f"Compiling the {name} step...")
  before, start = _hits, time.time()
  compiled = jitted.lower(*args).compile()
  source = " (loaded from the compilation cache)" if _hits > before else ""
  say(f"Compiled the {name} step in {time.time() - start:.1f} s{source}.")
  return compiled
