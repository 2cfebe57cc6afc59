"""One run planned on one topology: both steps compiled, the largest fitting batch, the
figures that follow, and the report a person reads."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

from train import errors
from train.plan.chips import DATASETS, GiB, Chip, accelerator_devices, split_size
from train.plan.cost import (OutOfMemory, StepCost, bound_seconds, compile_cost,
                             roofline_seconds)


def largest_fitting_batch(fits_at: Callable[[int], float | None], batch: int,
                          memory: float | None, fitted: bool, hbm: int, step: int = 1,
                          max_compiles: int = 5,
                          progress: Callable[[str], None] = lambda _: None,
                          ) -> tuple[int, int | None, list[int]]:
  """The largest per-chip batch (a multiple of `step`) whose train step compiles within HBM.

  `fits_at(b)` compiles at batch b and returns its memory, or raises OutOfMemory, which
  carries the memory the compiler needed. Memory is nearly linear in the batch, so the search
  scales the batch as if all memory grew with it (an undershoot, since parameters do not),
  extrapolates the line through the two largest fitting batches, and confirms the answer by
  compiling the batch after it; a failure brackets the answer, and the search interpolates (or
  bisects) inside the bracket. For a linear memory curve that is 3 compiles; the compiler's
  re-planning near the limit can take more, but never more than `max_compiles`. `progress`
  hears one line per compile, before it starts and with its outcome.
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
    progress(f"  compile {len(compiled) + 1} of at most {max_compiles}: {guess} images per "
             f"chip...")
    try:
      known[guess] = fits_at(guess)
      outcome[guess] = True
      progress(f"    fits ({_bytes(known[guess])})" if known[guess] else "    fits")
    except OutOfMemory as e:
      known[guess], outcome[guess] = e.required_bytes, False
      progress("    does not fit" + (f" (needs {_bytes(e.required_bytes)})"
                                     if e.required_bytes else ""))
    compiled.append(guess)
  lo = max((b for b, ok in outcome.items() if ok), default=0)
  hi = min((b for b, ok in outcome.items() if not ok), default=None)
  return lo, hi, compiled


@dataclasses.dataclass(frozen=True)
class Plan:
  """One run planned on one topology: figures per chip unless named global; None where the
  step they describe did not fit, where the chip has no such unit (the MXU fields on GPUs), or,
  for the max_batch fields, where no search was asked for."""

  # The run, as the trainer would lay it out.
  topology: str
  num_slices: int
  chip: str
  chips: int
  processes: int
  model: str
  dataset: str
  dtype: str
  memory_efficient: bool
  global_batch: int
  per_chip_batch: int
  eval_per_chip_batch: int
  steps_per_epoch: int
  total_steps: int
  # The chip's published figures.
  hbm_bytes: int
  chip_bf16_flops_per_s: float
  chip_hbm_bytes_per_s: float
  chip_mxu_width: int | None  # TPUs only
  chip_source: str
  # Both steps fit in HBM.
  fits: bool
  # The train step: what the compiler needs when it does not fit, else its memory and work.
  per_chip_required_bytes: float | None = None
  per_chip_argument_bytes: int | None = None
  per_chip_output_bytes: int | None = None
  per_chip_alias_bytes: int | None = None
  per_chip_temp_bytes: int | None = None
  per_chip_generated_code_bytes: int | None = None
  per_chip_peak_bytes: int | None = None
  headroom_bytes: int | None = None
  flops_per_step: float | None = None
  bytes_accessed_per_step: float | None = None
  work_source: str | None = None  # where flops and bytes accessed come from
  matmul_flops_per_step: float | None = None  # convolutions and dots, from the HLO
  mxu_flops_per_step: float | None = None  # the same padded to the MXU width
  flops_per_image: float | None = None
  bytes_accessed_per_image: float | None = None
  mxu_flops_per_image: float | None = None
  # The train step's roofline: three lower bounds (module docstring) and the one that binds.
  compute_bound_seconds: float | None = None
  mxu_bound_seconds: float | None = None
  memory_bound_seconds: float | None = None
  roofline_step_seconds: float | None = None
  bound: str | None = None
  roofline_images_per_s: float | None = None
  roofline_images_per_s_global: float | None = None
  compute_fraction_of_peak: float | None = None
  epoch_seconds: float | None = None
  run_seconds: float | None = None
  chip_hours: float | None = None
  compile_seconds: float | None = None
  compile_cpu_seconds: float | None = None
  # The eval step.
  eval_per_chip_required_bytes: float | None = None
  eval_per_chip_peak_bytes: int | None = None
  eval_per_chip_temp_bytes: int | None = None
  eval_flops_per_step: float | None = None
  eval_bytes_accessed_per_step: float | None = None
  eval_mxu_flops_per_step: float | None = None
  eval_compile_seconds: float | None = None
  eval_compile_cpu_seconds: float | None = None
  # The largest-batch search (--max_batch).
  max_per_chip_batch: int | None = None
  max_batch_not_fitting: int | None = None
  max_batch_compiles: list[int] | None = None
  estimate: str = "compiler estimates (ahead-of-time compile), not hardware measurements"

  def asdict(self) -> dict[str, Any]:
    """Every field by name: the planner's --json object."""
    return dataclasses.asdict(self)


def _train_figures(train: StepCost, evaluate: StepCost | None, chip: Chip, per_chip: int,
                   chips: int, eval_steps: int, evals: int, steps_per_epoch: int,
                   total_steps: int, eval_every_epochs: int) -> dict[str, Any]:
  """The Plan fields that follow from a train step that fits."""
  bounds = bound_seconds(train, chip)
  step_seconds, bound = roofline_seconds(train, chip)
  eval_pass = eval_steps * roofline_seconds(evaluate, chip)[0] if evaluate else 0.0
  run_seconds = total_steps * step_seconds + evals * eval_pass
  return dict(
      per_chip_argument_bytes=train.argument_bytes, per_chip_output_bytes=train.output_bytes,
      per_chip_alias_bytes=train.alias_bytes, per_chip_temp_bytes=train.temp_bytes,
      per_chip_generated_code_bytes=train.generated_code_bytes,
      per_chip_peak_bytes=train.peak_bytes,
      headroom_bytes=chip.hbm_bytes - max(train.peak_bytes,
                                          evaluate.peak_bytes if evaluate else 0),
      flops_per_step=train.flops, bytes_accessed_per_step=train.bytes_accessed,
      work_source=("the optimised HLO: convolutions and dots (elementwise work left out), "
                   "each kernel's operands and results" if train.from_hlo
                   else "the compiler's cost analysis") + (
                       f" (its {train.loops} loop bodies counted once each)" if train.loops
                       else ""),
      matmul_flops_per_step=train.matmul.flops,
      mxu_flops_per_step=train.matmul.mxu_flops if chip.mxu_width else None,
      flops_per_image=train.flops / per_chip,
      bytes_accessed_per_image=train.bytes_accessed / per_chip,
      mxu_flops_per_image=train.matmul.mxu_flops / per_chip if chip.mxu_width else None,
      compute_bound_seconds=bounds["compute"], mxu_bound_seconds=bounds.get("MXU-width compute"),
      memory_bound_seconds=bounds["HBM bandwidth"],
      roofline_step_seconds=step_seconds, bound=bound,
      roofline_images_per_s=per_chip / step_seconds,
      roofline_images_per_s_global=per_chip * chips / step_seconds,
      compute_fraction_of_peak=train.flops / chip.bf16_flops_per_s / step_seconds,
      epoch_seconds=steps_per_epoch * step_seconds + eval_pass / eval_every_epochs,
      run_seconds=run_seconds, chip_hours=run_seconds * chips / 3600,
      compile_seconds=train.compile_seconds, compile_cpu_seconds=train.compile_cpu_seconds)


def plan(config: Any, topology: str, num_slices: int = 1, max_batch: bool = True,
         progress: Callable[[str], None] = lambda _: None, model: Any = None,
         max_batch_compiles: int = 5, hlo_dir: str | None = None) -> Plan:
  """Compiles the run's train and eval steps for `topology` and says what they need per chip.

  `model` replaces the configured one (any flax module with the same `apply` signature and
  variable collections, e.g. a textbook DenseNet to compare against). `max_batch` also
  searches for the largest per-chip batch that fits, in at most `max_batch_compiles` compiles.
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
  chip, devices = accelerator_devices(topology, num_slices)
  chips = len(devices) // chip.devices_per_chip
  processes = len({d.process_index for d in devices})
  # the trainer's own batch errors: it splits batches over devices
  batches = validation.batches(config, len(devices), processes)
  steps_per_epoch, total_steps = validation.run_length(config, num_train)
  if model is None:
    model = step_lib.create_model(config, num_classes, channels, platform=chip.platform)
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

  def per_chip_cost(make_step: Callable[[Any], Any], batch: Any, hlo: str | None,
                    work: bool = True) -> StepCost:
    try:
      cost = compile_cost(make_step(model), state, batch, mxu_width=chip.mxu_width,
                          hlo_path=hlo)
      if work and cost.loops and hasattr(model, "unroll_layers"):
        # XLA's cost analysis counts a loop body once: the work is that of the same step
        # with every layer unrolled, its memory and compile time the step's own.
        progress("  ...and its loop-free form, for its flops and bytes accessed...")
        unrolled = compile_cost(make_step(model.clone(unroll_layers=True)), state, batch,
                                mxu_width=chip.mxu_width)
        cost = dataclasses.replace(cost, flops=unrolled.flops, matmul=unrolled.matmul,
                                   bytes_accessed=unrolled.bytes_accessed,
                                   loops=unrolled.loops)
    except OutOfMemory as e:
      if e.required_bytes:
        e.required_bytes *= chip.devices_per_chip
      raise
    cost = cost.times(chip.devices_per_chip)
    if cost.peak_bytes > chip.hbm_bytes:  # XLA:GPU compiles steps of any size
      raise OutOfMemory(f"{cost.peak_bytes} bytes", required_bytes=cost.peak_bytes)
    return cost

  def train_cost(per_chip: int, hlo: str | None = None, work: bool = True) -> StepCost:
    resized = config.copy_and_resolve_references()
    with resized.unlocked():
      resized.batch_size = per_chip * chips
    return per_chip_cost(lambda m: step_lib.make_train_step(m, tx, resized, mesh),
                         step_lib.abstract_batch(mesh, per_chip * chips, image), hlo, work)

  per_chip = batches.train // chips
  progress(f"Compiling the train step for {topology} ({chips} chips, {per_chip} images per "
           f"chip)...")
  train: StepCost | None = None
  needed: dict[str, Any] = {}
  try:
    train = train_cost(per_chip, hlo_path("train_step"))
  except OutOfMemory as e:
    needed["per_chip_required_bytes"] = e.required_bytes
  progress(f"Compiling the eval step ({batches.eval // chips} images per chip)...")
  evaluate: StepCost | None = None
  try:
    evaluate = per_chip_cost(
        lambda m: step_lib.make_eval_step(m, mesh),
        step_lib.abstract_batch(mesh, batches.eval, image, eval_batch=True),
        hlo_path("eval_step"))
  except OutOfMemory as e:
    needed["eval_per_chip_required_bytes"] = e.required_bytes
  figures: dict[str, Any] = {}
  if evaluate is not None:
    figures.update(eval_per_chip_peak_bytes=evaluate.peak_bytes,
                   eval_per_chip_temp_bytes=evaluate.temp_bytes,
                   eval_flops_per_step=evaluate.flops,
                   eval_bytes_accessed_per_step=evaluate.bytes_accessed,
                   eval_mxu_flops_per_step=evaluate.matmul.mxu_flops if chip.mxu_width else None,
                   eval_compile_seconds=evaluate.compile_seconds,
                   eval_compile_cpu_seconds=evaluate.compile_cpu_seconds)
  if train is not None:
    figures.update(_train_figures(
        train, evaluate, chip, per_chip, chips, eval_steps=math.ceil(num_eval / batches.eval),
        evals=max(1, (total_steps // steps_per_epoch) // config.eval_every_epochs),
        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        eval_every_epochs=config.eval_every_epochs))
  if max_batch:
    progress(f"Finding the largest per-chip batch that fits (at most {max_batch_compiles} more "
             f"train-step compiles)...")
    best, over, compiled = largest_fitting_batch(
        lambda b: train_cost(b, work=False).peak_bytes, per_chip,
        train.peak_bytes if train else needed.get("per_chip_required_bytes"), train is not None,
        chip.hbm_bytes, step=math.lcm(8 if per_chip % 8 == 0 else 1, chip.devices_per_chip),
        max_compiles=max_batch_compiles,
        progress=progress)
    figures.update(max_per_chip_batch=best, max_batch_not_fitting=over,
                   max_batch_compiles=compiled)
  return Plan(
      topology=topology, num_slices=num_slices, chip=chip.name, chips=chips,
      processes=processes, model=config.model, dataset=config.dataset,
      dtype="bfloat16" if config.half_precision else "float32",
      memory_efficient=config.memory_efficient, global_batch=batches.train,
      per_chip_batch=per_chip, eval_per_chip_batch=batches.eval // chips,
      steps_per_epoch=steps_per_epoch, total_steps=total_steps, hbm_bytes=chip.hbm_bytes,
      chip_bf16_flops_per_s=chip.bf16_flops_per_s, chip_hbm_bytes_per_s=chip.hbm_bytes_per_s,
      chip_mxu_width=chip.mxu_width, chip_source=chip.source,
      estimate=f"compiler estimates (ahead-of-time {'GPU' if chip.platform == 'cuda' else 'TPU'} "
               f"compile), not hardware measurements",
      fits=train is not None and evaluate is not None, **needed, **figures)


def _bytes(n: float) -> str:
  return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / (1 << 20):.1f} MiB"


def _duration(s: float) -> str:
  return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.2f} s"


def report(p: Plan) -> str:
  """The plan as the lines a person reads."""
  lines = [
      f"{p.model} on {p.topology}" + (f" x{p.num_slices} slices" if p.num_slices > 1 else "") +
      f": {p.chips} x {p.chip} chips, {p.processes} host(s); {p.dtype}, "
      f"batch {p.global_batch} ({p.per_chip_batch} per chip)"
      + (", memory_efficient" if p.memory_efficient else ""),
      f"Per chip, {p.estimate}:",
  ]
  if p.per_chip_peak_bytes is None:
    needed = p.per_chip_required_bytes
    lines.append(f"  memory      DOES NOT FIT: the compiler needs "
                 f"{_bytes(needed) if needed else 'more than'} of {_bytes(p.hbm_bytes)} HBM "
                 f"for the train step")
  else:
    lines += [
        f"  memory      arguments {_bytes(p.per_chip_argument_bytes)}, temporaries "
        f"{_bytes(p.per_chip_temp_bytes)}, in all {_bytes(p.per_chip_peak_bytes)} of "
        f"{_bytes(p.hbm_bytes)} HBM: {'fits' if p.fits else 'DOES NOT FIT'} (headroom "
        f"{_bytes(p.headroom_bytes)})" +
        (f"; eval step {_bytes(p.eval_per_chip_peak_bytes)}"
         if p.eval_per_chip_peak_bytes is not None else "; eval step DOES NOT FIT"),
        f"  work        {p.flops_per_step / 1e12:.3f} TFLOP and "
        f"{p.bytes_accessed_per_step / 1e9:.2f} GB accessed per step; "
        f"{p.flops_per_image / 1e9:.2f} GFLOP and {p.bytes_accessed_per_image / 1e6:.1f} "
        f"MB per image, from {p.work_source}" +
        (f"; {p.mxu_flops_per_image / 1e9:.2f} GFLOP per image as the {p.chip_mxu_width}-wide "
         f"MXU executes the convolutions and dots "
         f"({p.matmul_flops_per_step / p.mxu_flops_per_step:.0%} of its tiles used)"
         if p.mxu_flops_per_step else ""),
        f"  bounds      compute {p.compute_bound_seconds * 1e3:.3g} ms, " +
        (f"MXU-width compute {p.mxu_bound_seconds * 1e3:.3g} ms, "
         if p.mxu_bound_seconds is not None else "") +
        f"HBM bandwidth {p.memory_bound_seconds * 1e3:.3g} ms per step",
        f"  roofline    {p.roofline_step_seconds * 1e3:.2f} ms per step, bound by "
        f"{p.bound} ({p.compute_fraction_of_peak:.0%} of the bf16 peak): "
        f"{p.roofline_images_per_s:,.0f} images/s per chip, "
        f"{p.roofline_images_per_s_global:,.0f} in all",
        f"  run         {p.steps_per_epoch} steps per epoch, "
        f"{_duration(p.epoch_seconds)} per epoch at the roofline; {p.total_steps} steps: "
        f"{_duration(p.run_seconds)}, {p.chip_hours:,.1f} chip-hours",
        f"  compile     train step {p.compile_seconds:.1f} s "
        f"({p.compile_cpu_seconds:.0f} CPU-s here)" +
        (f", eval step {p.eval_compile_seconds:.1f} s" if p.eval_compile_seconds is not None
         else ""),
    ]
  if p.max_batch_compiles is not None:
    bracket = (f"{p.max_batch_not_fitting} does not" if p.max_batch_not_fitting is not None
               else "no larger batch was tried to fail")
    lines.append(f"  max batch   {p.max_per_chip_batch} per chip fits, {bracket} "
                 f"(compiled: {p.max_batch_compiles})" if p.max_per_chip_batch else
                 f"  max batch   no batch compiled fits (compiled: {p.max_batch_compiles})")
  lines.append(f"Chip figures: {p.chip_bf16_flops_per_s / 1e12:g} TFLOP/s bf16, "
               f"{p.chip_hbm_bytes_per_s / 1e9:g} GB/s HBM, {_bytes(p.hbm_bytes)}"
               + (f", {p.chip_mxu_width}-wide MXU" if p.chip_mxu_width else "") +
               f" ({p.chip_source}).")
  return "\n".join(lines)
