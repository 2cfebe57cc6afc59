"""`python -m densenet_jax.summary`: depth, parameters, MACs and training memory of every preset.

MACs are counted exactly from the forward jaxpr (every convolution and matmul); the memory
figure is XLA's compiled temp allocation for one training step (forward + backward).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from densenet_jax import backends, models

BATCH_CIFAR = 64
BATCH_IMAGENET = 32


def _sub_jaxprs(params: dict[str, Any]) -> list[jax.extend.core.Jaxpr]:
  found = []
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        found.append(v.jaxpr)
      elif isinstance(v, jax.extend.core.Jaxpr):
        found.append(v)
  return found


def _jaxpr_macs(jaxpr: jax.extend.core.Jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      out = eqn.outvars[0].aval.shape
      rhs = eqn.invars[1].aval.shape
      out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      total += math.prod(out) * math.prod(rhs) // rhs[out_feature_dim]
    elif name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    for sub in _sub_jaxprs(eqn.params):
      total += _jaxpr_macs(sub)
  return total


def forward_macs(model: models.DenseNet, input_shape: tuple[int, ...]) -> int:
  """Multiply-accumulates of one inference forward pass, counted from the jaxpr."""
  # One platform's program: left open, the choices would trace a branch per platform. The
  # concatenating block: the one-buffer block's loop bodies appear once in the jaxpr and its
  # widened 1x1 convolutions multiply zeros, neither of which is the model's arithmetic.
  model = model.clone(**{k: v for k, v in backends.fast_path().model_choices().items()
                         if getattr(model, k) is None} | {"block_buffer": False})
  variables = models.abstract_variables(model, input_shape)
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  return _jaxpr_macs(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x).jaxpr)


def train_loss(model: models.DenseNet, params: Any, batch_stats: Any, x: jax.Array,
               labels: jax.Array) -> tuple[jax.Array, Any]:
  """Mean cross-entropy of a training-mode forward pass, and the updated BN state."""
  logits, state = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                              mutable=["batch_stats"])
  logits = logits.astype(jnp.float32)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)), state


def train_step_temp_bytes(model: models.DenseNet, input_shape: tuple[int, ...]) -> int:
  """XLA temp bytes of a compiled forward+backward step (no data or device memory needed)."""
  variables = models.abstract_variables(model, input_shape)
  grad = jax.jit(jax.grad(functools.partial(train_loss, model), has_aux=True))
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  labels = jax.ShapeDtypeStruct(input_shape[:1], jnp.int32)
  compiled = grad.lower(variables["params"], variables["batch_stats"], x, labels).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def summarize(name: str, memory: bool = True) -> dict[str, Any]:
  """One row of the summary table for a preset."""
  model = models.get_model(name)
  shape = models.native_input_shape(model)
  row = {
      "model": name,
      "depth": model.depth,
      "growth": model.growth_rate,
      "input": f"{shape[1]}x{shape[2]}",
      "params": models.count_params(models.abstract_variables(model, shape)["params"]),
      "gmacs": forward_macs(model, shape) / 1e9,
  }
  if memory:
    batch = BATCH_CIFAR if model.stem == "cifar" else BATCH_IMAGENET
    train_shape = models.native_input_shape(model, batch)
    row["batch"] = batch
    row["temp_gib"] = train_step_temp_bytes(model, train_shape) / 2**30
    row["temp_gib_efficient"] = train_step_temp_bytes(
        model.clone(memory_efficient=True), train_shape) / 2**30
  return row


def markdown(rows: list[dict[str, Any]]) -> str:
  """Renders summary rows as a markdown table."""
  memory = "temp_gib" in rows[0]
  head = "| model | depth | k | input | params | GMACs |"
  rule = "|---|---|---|---|---|---|"
  if memory:
    head += " batch | train temp GiB | memory_efficient GiB | ratio |"
    rule += "---|---|---|---|"
  lines = [head, rule]
  for r in rows:
    line = (f"| {r['model']} | {r['depth']} | {r['growth']} | {r['input']} | "
            f"{r['params']:,} | {r['gmacs']:.3f} |")
    if memory:
      line += (f" {r['batch']} | {r['temp_gib']:.2f} | {r['temp_gib_efficient']:.2f} | "
               f"{r['temp_gib_efficient'] / r['temp_gib']:.2f} |")
    lines.append(line)
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  """Prints the summary table (markdown, or JSON lines with --json)."""
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--models", nargs="*", default=models.list_models(),
                      help="presets to include (default: all)")
  parser.add_argument("--no-memory", action="store_true",
                      help="skip compiling training steps (fast)")
  parser.add_argument("--json", action="store_true", help="print JSON lines")
  args = parser.parse_args(argv)
  rows = []
  for i, name in enumerate(args.models):
    start = time.perf_counter()
    rows.append(summarize(name, memory=not args.no_memory))
    if args.json:
      print(json.dumps(rows[-1]), flush=True)
    elif not args.no_memory:  # two training-step compiles per model: say where it is
      print(f"[{i + 1}/{len(args.models)}] {name}: {time.perf_counter() - start:.1f} s",
            file=sys.stderr, flush=True)
  if not args.json:
    print(markdown(rows))
    if not args.no_memory:
      print(f"\nTraining-step temp memory: XLA memory_analysis() on {jax.default_backend()}, "
            f"float32, batch {BATCH_CIFAR} (CIFAR) / {BATCH_IMAGENET} (ImageNet).")


if __name__ == "__main__":
  main()
