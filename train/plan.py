"""Plans a run on a TPU slice that is not here: does it fit, how fast can it go, how long to compile.

    python -m train.plan --config configs/imagenet_densenet121.py --topology v5e:16x16
    python -m train.plan --config configs/cifar_bc.py --topology v6e:2x2 --json

Compiles, ahead of time on this machine's CPU, exactly the train and eval steps `train.main`
would run on that topology (same model, optimizer, dtype, sharding, donation and batch per
chip; `--config.FIELD=VALUE` overrides work as in train.main) and reports, per chip, what the
TPU compiler says: memory (arguments, temporaries, peak against the chip's HBM), flops and HBM
bytes accessed per step, and from those a roofline step time against the chip's published peak.
Every figure is a compiler estimate, not a measurement on hardware. Needs libtpu:
`pip install -e '.[tpu]'`. No data and no workdir: dataset sizes come from a table of the
shipped datasets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable

# Compiling for a topology needs libtpu but never a TPU: keep JAX itself on the CPU, and let
# several planners (or tests) load libtpu at once.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from train import cli, errors

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program: train.main has --config too)."""
  config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
  flags.DEFINE_string("topology", "v5e:2x2",
                      "A TPU slice: GENERATION:SHAPE, e.g. v5e:2x2, v5e:16x16, v6e:4x4, "
                      "v4:2x2x1, v5p:2x2x1, tpu7x:2x2x1.")
  flags.DEFINE_integer("num_slices", 1, "Slices joined by the data-center network (multislice).")
  flags.DEFINE_bool("max_batch", True,
                    "Also find the largest per-chip batch whose train step fits in HBM "
                    "(usually 3 more compiles of the train step).")
  flags.DEFINE_bool("json", False, "Print one JSON object as the last line of the output.")
  flags.DEFINE_string("dump_hlo", None, "A folder for the optimised HLO text of both steps.")


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures of one accelerator generation."""

  name: str
  hbm_bytes: int
  bf16_flops_per_s: float
  hbm_bytes_per_s: float
  chip_config: str  # libtpu's name for one device per chip
  source: str


GiB = 1 << 30
# Per chip, from Google Cloud's TPU pages (bf16 peak, HBM capacity and bandwidth), 2026-12.
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1200e9, "megacore",
               "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9, "default",
                "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9, "megacore",
                "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e (Trillium)", 32 * GiB, 918e12, 1638e9, "default",
                "https://cloud.google.com/tpu/docs/v6e"),
    "tpu7x": Chip("TPU7x (Ironwood)", 192 * GiB, 2307e12, 7380e9, "default",
                  "https://cloud.google.com/tpu/docs/tpu7x"),
}

# Examples per split of the shipped configs' datasets (tfds catalog), so that planning needs
# no data: (splits, classes, channels).
DATASETS: dict[str, tuple[dict[str, int], int, int]] = {
    "cifar10": ({"train": 50_000, "test": 10_000}, 10, 3),
    "cifar100": ({"train": 50_000, "test": 10_000}, 100, 3),
    "svhn_cropped": ({"train": 73_257, "extra": 531_131, "test": 26_032}, 10, 3),
    "imagenet2012": ({"train": 1_281_167, "validation": 50_000}, 1000, 3),
    "imagenette/320px-v2": ({"train": 9_469, "validation": 3_925}, 10, 3),
    "sklearn_digits": ({"train": 1_437, "test": 360}, 10, 1),
}


def split_size(dataset: str, split: str, field: str = "train_split") -> int:
  """Examples in a tfds split expression such as 'train', 'train+extra' or 'train[:90%]'."""
  splits = DATASETS[dataset][0]
  total = 0
  for part in split.split("+"):
    m = re.fullmatch(r"\s*(\w+)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*", part)
    if not m or m.group(1) not in splits:
      raise errors.ConfigError(
          f"--config.{field}={split}: cannot size this split of {dataset} (splits: "
          f"{', '.join(splits)}).")
    n = splits[m.group(1)]

    def bound(text: str | None, default: int) -> int:
      if text is None:
        return default
      value = int(text.rstrip("%"))
      value = round(value * n / 100) if text.endswith("%") else value
      return min(n, max(0, value + n if value < 0 else value))

    total += max(0, bound(m.group(3), n) - bound(m.group(2), 0))
  return total


def tpu_devices(topology: str, num_slices: int = 1) -> tuple[Chip, list[Any]]:
  """The chip figures and the devices of a named TPU topology (one device per chip)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  generation = topology.split(":", 1)[0]
  if generation not in CHIPS or ":" not in topology:
    raise errors.ConfigError(
        f"--topology={topology}: expected GENERATION:SHAPE with GENERATION one of "
        f"{', '.join(CHIPS)}, e.g. v5e:2x2 or v4:2x2x1.")
  if importlib.util.find_spec("libtpu") is None:
    raise errors.ConfigError("Planning for a TPU needs libtpu (no TPU is needed): "
                             "pip install -e '.[tpu]'.")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  chip = CHIPS[generation]
  try:
    with cli.stderr_to(os.devnull):  # libtpu's warnings that no TPU is attached
      topo = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                          chip_config_name=chip.chip_config,
                                          num_slices=num_slices)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.ConfigError(
        f"--topology={topology} --num_slices={num_slices}: libtpu does not know this "
        f"topology ({str(e).splitlines()[0] if str(e) else type(e).__name__}). Use a slice "
        f"shape Google Cloud sells, e.g. v5e:2x2, v5e:16x16, v6e:4x4, v4:2x2x1.") from e
  return chip, list(topo.devices)


@dataclasses.dataclass(frozen=True)
class StepCost:
  """What the compiler says about one compiled step, per chip."""

  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  generated_code_bytes: int
  peak_bytes: int
  flops: float
  bytes_accessed: float
  compile_seconds: float
  compile_cpu_seconds: float


class OutOfMemory(Exception):
  """The TPU compiler found no schedule of the step that fits in HBM."""

  def __init__(self, message: str):
    super().__init__(message)
    found = re.search(r"required for HLO temporaries \(([\d.]+)G\)", message)
    self.required_bytes = float(found.group(1)) * GiB if found else None


def compile_cost(lowerable: Any, *args: Any, hlo_path: str | None = None) -> StepCost:
  """Lowers and compiles `lowerable(*args)` (a jitted function) and reads its analyses.

  `hlo_path` receives the optimised HLO (the fusions, shapes and TPU layouts behind the bytes).
  Raises OutOfMemory when the compiler reports that the step cannot fit in the chip's HBM
  (it rematerialises on its own before it gives up, so this is its verdict, not ours).
  """
  wall, cpu = time.perf_counter(), time.process_time()
  try:
    compiled = lowerable.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" in str(e) or "HbmOom" in str(e):
      raise OutOfMemory(str(e)) from None
    raise
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(compiled.as_text())
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  components = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                - memory.alias_size_in_bytes + memory.temp_size_in_bytes
                + memory.generated_code_size_in_bytes)
  return StepCost(
      argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
      generated_code_bytes=memory.generated_code_size_in_bytes,
      # What the step holds in HBM: the compiler's `peak_memory_in_bytes` is a heap
      # simulation that can come out below the temporaries alone, so it is not used.
      peak_bytes=components,
      flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      compile_seconds=wall, compile_cpu_seconds=cpu)


def roofline_seconds(cost: StepCost, chip: Chip) -> tuple[float, str]:
  """The step's lower bound on `chip`: compute at bf16 peak or HBM traffic at full bandwidth."""
  compute = cost.flops / chip.bf16_flops_per_s
  memory = cost.bytes_accessed / chip.hbm_bytes_per_s
  return (compute, "compute") if compute >= memory else (memory, "HBM bandwidth")


def largest_fitting_batch(fits_at: Callable[[int], float | None], batch: int,
                          memory: float | None, fitted: bool, hbm: int, step: int = 1,
                          max_compiles: int = 5) -> tuple[int, int | None, list[int]]:
  """The largest per-chip batch (a multiple of `step`) whose train step compiles within HBM.

  `fits_at(b)` compiles at batch b and returns its memory, or raises OutOfMemory, which
  carries the memory the compiler needed. Memory is nearly linear in the batch, so the search
  scales the batch as if all memory grew with it (an undershoot, since parameters do not),
  extrapolates the line through the two largest fitting batches, and confirms the answer by
  compiling the batch after it; a failure brackets the answer, and the search interpolates (or
  bisects) inside the bracket. For a linear memory curve that is 3 compiles; the compiler's
  re-planning near the limit can take more, up to `max_compiles`.
  Returns (largest fitting, smallest known not fitting or None, batches compiled).
  """
  known: dict[int, float | None] = {batch: memory}
  outcome: dict[int, bool] = {batch: fitted}
  compiled: list[int] = []
  while len(compiled) < max_compiles:
    lo = max((b for b, ok in outcome.items() if ok), default=0)
    hi = min((b for b, ok in outcome.items() if not ok), default=None)
    if hi is not None and hi - lo <= step:
      break
    fitting = sorted((b, m) for b, m in known.items() if outcome[b] and m)
    slope = ((fitting[-1][1] - fitting[-2][1]) / (fitting[-1][0] - fitting[-2][0])
             if len(fitting) >= 2 else 0.0)
    if hi is not None and compiled and outcome[compiled[-1]]:
      guess = lo + step  # the last guess fitted: does the next batch fail?
    elif hi is not None and known.get(hi) and lo > 0 and known[hi] > known[lo]:
      # between the largest fitting and the smallest failing batch, memory is ~linear
      guess = lo + (hbm - known[lo]) * (hi - lo) / (known[hi] - known[lo])
    elif hi is not None:
      guess = (lo + hi) / 2
    elif slope > 0:
      guess = lo + (hbm - known[lo]) / slope  # the line through the two largest fitting
    elif lo > 0 and known[lo]:
      guess = lo * hbm / known[lo]  # as if all memory grew with the batch: an undershoot
    else:
      guess = 2 * max(lo, 1)
    guess = int(guess) // step * step
    if guess <= lo or (hi is not None and guess >= hi):
      guess = (lo + step if hi is None else (lo + hi) // 2 // step * step)
      if guess <= lo:
        guess = lo + step
    if hi is not None and guess >= hi:
      break
    try:
      known[guess] = fits_at(guess)
      outcome[guess] = True
    except OutOfMemory as e:
      known[guess], outcome[guess] = e.required_bytes, False
    compiled.append(guess)
  lo = max((b for b, ok in outcome.items() if ok), default=0)
  hi = min((b for b, ok in outcome.items() if not ok), default=None)
  return lo, hi, compiled


def plan(config: Any, topology: str, num_slices: int = 1, max_batch: bool = True,
         progress: Callable[[str], None] = lambda _: None, model: Any = None,
         max_batch_compiles: int = 5, hlo_dir: str | None = None) -> dict[str, Any]:
  """Compiles the run's train and eval steps for `topology`; every per-chip figure, as a dict.

  `model` replaces the configured one (any flax module with the same `apply` signature and
  variable collections, e.g. a textbook DenseNet to compare against).
  """
  from train import step as step_lib, validation  # pylint: disable=g-import-not-at-top
  validation.validate(config)
  if config.dataset not in DATASETS:
    raise errors.ConfigError(
        f"--config.dataset={config.dataset}: the planner knows the sizes of "
        f"{', '.join(DATASETS)}; plan with one of them at the same image size.")
  _, num_classes, channels = DATASETS[config.dataset]
  num_train = split_size(config.dataset, config.train_split)
  num_eval = split_size(config.dataset, config.eval_split, "eval_split")
  chip, devices = tpu_devices(topology, num_slices)
  chips = len(devices)
  processes = len({d.process_index for d in devices})
  batches = validation.batches(config, chips, processes)  # the trainer's own batch errors
  steps_per_epoch, total_steps = validation.run_length(config, num_train)
  if model is None:
    model = step_lib.create_model(config, num_classes, channels, platform="tpu")
  tx = step_lib.create_optimizer(
      config, step_lib.learning_rate_fn(config, steps_per_epoch, total_steps))
  mesh = step_lib.make_mesh(devices)
  image = (config.image_size, config.image_size, channels)
  state = step_lib.abstract_train_state(model, tx, (1, *image), mesh, config.seed)

  def hlo_path(name: str) -> str | None:
    if not hlo_dir:
      return None
    os.makedirs(hlo_dir, exist_ok=True)
    return os.path.join(hlo_dir, f"{name}.hlo.txt")

  def train_cost(per_chip: int, hlo: str | None = None) -> StepCost:
    resized = config.copy_and_resolve_references()
    with resized.unlocked():
      resized.batch_size = per_chip * chips
    return compile_cost(step_lib.make_train_step(model, tx, resized, mesh), state,
                        step_lib.abstract_batch(mesh, per_chip * chips, image), hlo_path=hlo)

  per_chip = batches.train // chips
  result: dict[str, Any] = {
      "topology": topology, "num_slices": num_slices, "chip": chip.name, "chips": chips,
      "processes": processes, "model": config.model, "dataset": config.dataset,
      "dtype": "bfloat16" if config.half_precision else "float32",
      "memory_efficient": config.memory_efficient,
      "global_batch": batches.train, "per_chip_batch": per_chip, "hbm_bytes": chip.hbm_bytes,
      "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
      "eval_per_chip_batch": batches.eval // chips,
      "chip_bf16_flops_per_s": chip.bf16_flops_per_s,
      "chip_hbm_bytes_per_s": chip.hbm_bytes_per_s, "chip_source": chip.source,
      "estimate": "compiler estimates (ahead-of-time TPU compile), not hardware measurements",
  }
  progress(f"Compiling the train step for {topology} ({chips} chips, {per_chip} images per "
           f"chip)...")
  try:
    train: StepCost | None = train_cost(per_chip, hlo_path("train_step"))
  except OutOfMemory as e:
    train = None
    result.update(fits=False, per_chip_required_bytes=e.required_bytes)
  progress(f"Compiling the eval step ({batches.eval // chips} images per chip)...")
  try:
    evaluate: StepCost | None = compile_cost(
        step_lib.make_eval_step(model, mesh), state,
        step_lib.abstract_batch(mesh, batches.eval, image, eval_batch=True),
        hlo_path=hlo_path("eval_step"))
  except OutOfMemory as e:
    evaluate = None
    result.update(fits=False, eval_per_chip_required_bytes=e.required_bytes)
  if evaluate is not None:
    result.update(eval_per_chip_peak_bytes=evaluate.peak_bytes,
                  eval_per_chip_temp_bytes=evaluate.temp_bytes,
                  eval_flops_per_step=evaluate.flops,
                  eval_bytes_accessed_per_step=evaluate.bytes_accessed,
                  eval_compile_seconds=evaluate.compile_seconds,
                  eval_compile_cpu_seconds=evaluate.compile_cpu_seconds)
  if train is not None:
    train_seconds, bound = roofline_seconds(train, chip)
    evals = max(1, (total_steps // steps_per_epoch) // config.eval_every_epochs)
    eval_pass = (math.ceil(num_eval / batches.eval) * roofline_seconds(evaluate, chip)[0]
                 if evaluate is not None else 0.0)
    run_seconds = total_steps * train_seconds + evals * eval_pass
    result.update({
        "per_chip_argument_bytes": train.argument_bytes,
        "per_chip_output_bytes": train.output_bytes, "per_chip_alias_bytes": train.alias_bytes,
        "per_chip_temp_bytes": train.temp_bytes,
        "per_chip_generated_code_bytes": train.generated_code_bytes,
        "per_chip_peak_bytes": train.peak_bytes,
        "fits": result.get("fits", True),
        "headroom_bytes": chip.hbm_bytes - max(train.peak_bytes,
                                               evaluate.peak_bytes if evaluate else 0),
        "flops_per_step": train.flops, "bytes_accessed_per_step": train.bytes_accessed,
        "flops_per_image": train.flops / per_chip,
        "bytes_accessed_per_image": train.bytes_accessed / per_chip,
        "roofline_step_seconds": train_seconds, "bound": bound,
        "roofline_images_per_s": per_chip / train_seconds,
        "roofline_images_per_s_global": per_chip * chips / train_seconds,
        "compute_fraction_of_peak": train.flops / chip.bf16_flops_per_s / train_seconds,
        "epoch_seconds": steps_per_epoch * train_seconds + eval_pass / config.eval_every_epochs,
        "run_seconds": run_seconds, "chip_hours": run_seconds * chips / 3600,
        "compile_seconds": train.compile_seconds,
        "compile_cpu_seconds": train.compile_cpu_seconds,
    })
  if max_batch or train is None:
    progress("Finding the largest per-chip batch that fits (a few more train-step compiles)...")
    best, over, compiled = largest_fitting_batch(
        lambda b: train_cost(b).peak_bytes, per_chip,
        train.peak_bytes if train else result.get("per_chip_required_bytes"), train is not None,
        chip.hbm_bytes, step=8 if per_chip % 8 == 0 else 1, max_compiles=max_batch_compiles)
    result.update(max_per_chip_batch=best, max_batch_not_fitting=over,
                  max_batch_compiles=compiled)
  return result


def _bytes(n: float) -> str:
  return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / (1 << 20):.1f} MiB"


def _duration(s: float) -> str:
  return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.2f} s"


def report(p: dict[str, Any]) -> str:
  """The plan as the lines a person reads."""
  lines = [
      f"{p['model']} on {p['topology']}" + (f" x{p['num_slices']} slices" if p["num_slices"] > 1
                                             else "") +
      f": {p['chips']} x {p['chip']} chips, {p['processes']} host(s); {p['dtype']}, "
      f"batch {p['global_batch']} ({p['per_chip_batch']} per chip)"
      + (", memory_efficient" if p["memory_efficient"] else ""),
      "Per chip (compiler estimates from an ahead-of-time compile, not hardware measurements):",
  ]
  if "per_chip_peak_bytes" not in p:
    needed = p.get("per_chip_required_bytes")
    lines.append(f"  memory      DOES NOT FIT: the compiler needs "
                 f"{_bytes(needed) if needed else 'more than'} of {_bytes(p['hbm_bytes'])} HBM "
                 f"for the train step")
  else:
    lines += [
        f"  memory      arguments {_bytes(p['per_chip_argument_bytes'])}, temporaries "
        f"{_bytes(p['per_chip_temp_bytes'])}, in all {_bytes(p['per_chip_peak_bytes'])} of "
        f"{_bytes(p['hbm_bytes'])} HBM: {'fits' if p['fits'] else 'DOES NOT FIT'} (headroom "
        f"{_bytes(p['headroom_bytes'])})" +
        (f"; eval step {_bytes(p['eval_per_chip_peak_bytes'])}"
         if "eval_per_chip_peak_bytes" in p else "; eval step DOES NOT FIT"),
        f"  work        {p['flops_per_step'] / 1e12:.3f} TFLOP and "
        f"{p['bytes_accessed_per_step'] / 1e9:.2f} GB accessed per step; "
        f"{p['flops_per_image'] / 1e9:.2f} GFLOP and {p['bytes_accessed_per_image'] / 1e6:.1f} "
        f"MB per image",
        f"  roofline    {p['roofline_step_seconds'] * 1e3:.2f} ms per step, bound by "
        f"{p['bound']} ({p['compute_fraction_of_peak']:.0%} of the bf16 peak): "
        f"{p['roofline_images_per_s']:,.0f} images/s per chip, "
        f"{p['roofline_images_per_s_global']:,.0f} in all",
        f"  run         {p['steps_per_epoch']} steps per epoch, "
        f"{_duration(p['epoch_seconds'])} per epoch at the roofline; {p['total_steps']} steps: "
        f"{_duration(p['run_seconds'])}, {p['chip_hours']:,.1f} chip-hours",
        f"  compile     train step {p['compile_seconds']:.1f} s "
        f"({p['compile_cpu_seconds']:.0f} CPU-s here)" +
        (f", eval step {p['eval_compile_seconds']:.1f} s" if "eval_compile_seconds" in p
         else ""),
    ]
  if "max_per_chip_batch" in p:
    over = p["max_batch_not_fitting"]
    bracket = (f"{over} does not" if over is not None
               else "no larger batch was tried to fail")
    lines.append(f"  max batch   {p['max_per_chip_batch']} per chip fits, {bracket} "
                 f"(compiled: {p['max_batch_compiles']})")
  lines.append(f"Chip figures: {p['chip_bf16_flops_per_s'] / 1e12:g} TFLOP/s bf16, "
               f"{p['chip_hbm_bytes_per_s'] / 1e9:g} GB/s HBM, {_bytes(p['hbm_bytes'])} "
               f"({p['chip_source']}).")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  """Plans the configured run on --topology and prints the report (and JSON)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.config is None:
    print("error: --config is required, e.g. --config configs/cifar_bc.py.", file=sys.stderr)
    sys.exit(2)
  try:
    result = plan(FLAGS.config, FLAGS.topology, FLAGS.num_slices, FLAGS.max_batch,
                  progress=lambda text: print(text, flush=True), hlo_dir=FLAGS.dump_hlo)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(report(result))
  if FLAGS.json:
    print(json.dumps(result))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, __doc__))
