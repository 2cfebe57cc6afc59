"""One train loop: validate, restore or initialise, train with verified checkpoints, evaluate.

`train_and_evaluate` reads as flax's examples/imagenet: `prepare` (config, devices, dataset,
model), `restore_or_initialize`, then one `for step, batch in ...` loop that logs, checkpoints
and evaluates. The step itself lives in `train.step`, the workdir lock in `train.workdir`, what
a run shows in `train.reporting`. The input pipeline (TensorFlow, tfds) is imported by
`prepare`, which binds the run's batch streams.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from densenet_jax import models, pretrained
from train import (checkpointing, compilation, errors, preemption as preemption_lib, reporting,
                   validation, workdir as workdir_lib)
from train.step import (TrainState, abstract_batch, abstract_train_state, create_model,
                        create_optimizer, create_train_state, global_batch, learning_rate_fn,
                        lr_boundaries, make_eval_step, make_mesh, make_train_step, warm_start,
                        warmup_steps)

if TYPE_CHECKING:
  import ml_collections
  from train import input_pipeline

_host = checkpointing.host_value


@dataclasses.dataclass
class Run:
  """What one launch of the trainer works with, resolved from the config and the dataset."""

  config: ml_collections.ConfigDict
  workdir: epath.Path
  info: input_pipeline.DatasetInfo
  batches: validation.Batches
  steps_per_epoch: int
  total_steps: int
  model: models.DenseNet
  lr_fn: optax.Schedule
  tx: optax.GradientTransformation
  mesh: Mesh
  pretrained: tuple[Any, dict[str, Any]] | None  # (variables, metadata) of config.init_from
  train_batches: Callable[[int], Iterator[dict[str, np.ndarray]]]  # local batches from a step on
  eval_batches: Callable[[], Iterator[dict[str, np.ndarray]]]  # the whole eval split, padded

  def identity(self) -> dict[str, Any]:
    """What determines the saved state's structure; a checkpoint must match it to resume."""
    c = self.config
    return {"model": c.model, "model_overrides": dict(c.model_overrides),
            "half_precision": c.half_precision, "dataset": c.dataset,
            "num_classes": self.info.num_classes, "channels": self.info.channels,
            "optimizer": "sgd+momentum" if c.momentum else "sgd"}

  def schedule(self) -> dict[str, Any]:
    """The learning-rate schedule in steps (recorded with checkpoints, compared on resume)."""
    c = self.config
    return {"total_steps": self.total_steps, "lr_schedule": c.lr_schedule,
            "learning_rate": c.learning_rate,
            "boundaries": lr_boundaries(c, self.total_steps) if c.lr_schedule == "piecewise"
                          else [], "warmup_steps": warmup_steps(c, self.steps_per_epoch)}

  def meta(self) -> dict[str, Any]:
    """The JSON saved with every checkpoint (the dataset is part of the identity)."""
    return {"seed": self.config.seed, "batch_size": self.config.batch_size,
            "identity": self.identity(), "schedule": self.schedule()}

  def summary(self, params: int, resumed: bool) -> list[tuple[str, Any]]:
    """The start-up summary's rows: model, data, devices, batch, steps, schedule, workdir."""
    c, info, b = self.config, self.info, self.batches
    overrides = ", ".join(f"{k}={v}" for k, v in dict(c.model_overrides).items())
    s = self.schedule()
    schedule = (f"{c.lr_schedule}, lr {c.learning_rate:g}" +
                (f" x{c.lr_decay:g} at steps {s['boundaries']}" if s["boundaries"] else "") +
                (f", {s['warmup_steps']} warmup steps" if s["warmup_steps"] else ""))
    devices = jax.device_count()
    eval_note = (f" ({c.eval_batch_size} rounded up to {devices} devices; padding is masked)"
                 if b.eval != c.eval_batch_size else "")
    return [
        ("model", f"{c.model}" + (f" ({overrides})" if overrides else "") +
         f", {params:,} parameters, {'bfloat16' if c.half_precision else 'float32'}"),
        ("data", f"{c.dataset}: {info.num_train:,} train ({c.train_split}) / "
                 f"{info.num_eval:,} eval ({c.eval_split}), {info.num_classes} classes, "
                 f"augment={c.augment}"),
        ("devices", f"{jax.process_count()} process(es) x {jax.local_device_count()} "
                    f"{jax.default_backend()} device(s) = {devices}"),
        ("batch", f"{b.train} global, {b.local_train} per process, {b.train // devices} per "
                  f"device; eval {b.eval}{eval_note}"),
        ("steps", f"{self.steps_per_epoch} per epoch, {self.total_steps} in total"),
        ("schedule", schedule),
        ("workdir", f"{self.workdir}" + (" (resumed)" if resumed else "")),
    ]


def prepare(config: ml_collections.ConfigDict, workdir: epath.Path) -> Run:
  """Validates the config against itself, the devices and the dataset; builds the model."""
  validation.validate(config)
  batches = validation.batches(config, jax.device_count(), jax.process_count())
  # TensorFlow loads here, not when train.main imports this module: main loads it later,
  # quietly, once its signal handlers are in place.
  from train import input_pipeline  # pylint: disable=g-import-not-at-top
  builder = input_pipeline.get_builder(config)
  info = input_pipeline.dataset_info(builder, config)
  if config.augment != "imagenet" and info.image_size != (config.image_size,) * 2:
    raise errors.ConfigError(
        f"{config.dataset} images are {info.image_size}, but config.image_size="
        f"{config.image_size}: set --config.image_size={info.image_size[0]}, or use "
        f"--config.augment=imagenet to crop and resize.")
  steps_per_epoch, total_steps = validation.run_length(config, info.num_train)
  weights = None
  if config.init_from:  # read once: its BatchNorm epsilon builds the model, its arrays start it
    try:
      _, variables, meta = pretrained.load_with_metadata(config.init_from)
    except OSError as e:  # a missing file, a directory: the reader's message names the path
      raise errors.ConfigError(f"--config.init_from: {e}") from e
    weights = (variables, meta)
  try:
    model = create_model(config, info.num_classes, info.channels,
                         bn_epsilon=weights[1]["bn_epsilon"] if weights else None)
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f"Cannot build --config.model={config.model} for "
                             f"{config.dataset}: {e}") from e
  lr_fn = learning_rate_fn(config, steps_per_epoch, total_steps)
  eval_steps = input_pipeline.eval_batches_needed(info.num_eval, batches.local_eval)
  return Run(config=config, workdir=workdir, info=info, batches=batches,
             steps_per_epoch=steps_per_epoch, total_steps=total_steps, model=model,
             lr_fn=lr_fn, tx=create_optimizer(config, lr_fn), mesh=make_mesh(),
             pretrained=weights,
             train_batches=functools.partial(input_pipeline.train_iterator, builder, config,
                                             batches.local_train, steps_per_epoch),
             eval_batches=functools.partial(input_pipeline.eval_iterator, builder, config,
                                            info.channels, batches.local_eval, eval_steps))


def restore_or_initialize(run: Run, ckpt: checkpointing.Checkpointer
                          ) -> tuple[TrainState, dict[str, Any] | None]:
  """The newest intact checkpoint of this run, else a fresh (or warm-started) state."""
  config, replicated = run.config, NamedSharding(run.mesh, P())
  input_shape = (1, config.image_size, config.image_size, run.info.channels)
  init = lambda rng: create_train_state(run.model, run.tx, input_shape, rng)
  abstract = abstract_train_state(run.model, run.tx, input_shape, run.mesh, config.seed)
  restored = ckpt.restore(abstract, run.identity())
  if restored is not None:
    return restored
  if config.eval_only:
    raise errors.CheckpointError(
        f"eval_only: no checkpoint in {ckpt.directory}. Train first, or point --workdir at a "
        f"finished run.")
  state = jax.jit(init, out_shardings=replicated)(jax.random.key(config.seed))
  if run.pretrained is not None:
    state = jax.device_put(warm_start(state, *run.pretrained, config.init_from, run.tx),
                           replicated)
  return state, None


def evaluate(run: Run, state: TrainState,
             eval_step: Callable[[TrainState, dict[str, jax.Array]], dict[str, jax.Array]]
             ) -> dict[str, float]:
  """Loss, top-1 and top-5 accuracy over the whole eval split (padding masked out)."""
  sums = functools.reduce(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b),
                          (eval_step(state, global_batch(run.mesh, b))
                           for b in run.eval_batches()))
  sums = {k: float(_host(v)) for k, v in sums.items()}
  return {"loss": sums["loss"] / sums["count"], "accuracy": sums["top1"] / sums["count"],
          "top5_accuracy": sums["top5"] / sums["count"], "examples": sums["count"]}


def _resume_warnings(run: Run, meta: dict[str, Any], step: int) -> list[str]:
  """What differs between the checkpoint's run and this one (the data order, the schedule)."""
  c, warnings = run.config, []
  if meta.get("seed") != c.seed or meta.get("batch_size") != c.batch_size:
    warnings.append(
        f"Warning: the checkpoint was written with seed={meta.get('seed')} batch_size="
        f"{meta.get('batch_size')}; this run uses seed={c.seed} batch_size={c.batch_size}, so "
        f"the data order differs from the original run.")
  old, new = meta.get("schedule"), checkpointing.json_round_trip(run.schedule())
  if old and old != new and step < run.total_steps and not c.eval_only:
    warnings.append(
        f"Warning: the learning-rate schedule differs from the one this checkpoint was trained "
        f"with: total steps {old.get('total_steps')} -> {run.total_steps}, boundaries "
        f"{old.get('boundaries')} -> {new['boundaries']}, base lr {old.get('learning_rate')} -> "
        f"{c.learning_rate}. The run continues on the schedule of the current config, as a "
        f"fresh run with it would: lr {float(run.lr_fn(step)):.4g} from step {step}. Rerun with "
        f"the original values to keep the original schedule.")
  return warnings


def _window_scalars(run: Run, window: list[dict[str, jax.Array]], started: float, step: int,
                    last_checkpoint: int | None) -> dict[str, float]:
  """The logging window's step means, learning rate and throughput (from `started`, the
  window's start time, to its last step's result); stops a diverged run before it logs or
  checkpoints a non-finite state."""
  scalars = {k: float(np.mean([_host(m[k]) for m in window])) for k in window[0]}
  seconds = time.time() - started  # after the results: the steps run asynchronously
  if not (math.isfinite(scalars["loss"]) and math.isfinite(scalars["grad_norm"])):
    raise errors.DivergedError(
        f"Training diverged by step {step}: mean loss={scalars['loss']}, gradient norm="
        f"{scalars['grad_norm']} over the last {len(window)} steps; "
        f"{checkpointing.newest_text(last_checkpoint)}. {errors.DIVERGENCE_FIX}")
  return scalars | {"learning_rate": float(run.lr_fn(step - 1)),
                    "images_per_second": len(window) * run.config.batch_size / seconds}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       preemption: preemption_lib.Preemption | None = None
                       ) -> tuple[TrainState, dict[str, float]]:
  """Trains (or only evaluates, with config.eval_only); returns the state and eval metrics.

  Stops early (returning no metrics) at the step where a SIGTERM or Ctrl-C was agreed, once
  that step is checkpointed.
  """
  run = prepare(config, workdir_lib.resolve(workdir))
  if jax.process_count() == 1:
    # Several processes compile every step afresh. Each computes its own cache key for the
    # same program (JAX makes keys process-independent on GPU only) and only process 0
    # writes, so on a relaunch process 0 loaded what the others compiled anew, and on
    # XLA:CPU (JAX 0.12.1) those two executables never met in their first collective: the
    # run waited forever. An optimisation may not do that (docs/training.md).
    compilation.enable_cache(config.get("compilation_cache_dir", ""))
  with contextlib.ExitStack() as stack:
    if preemption is None:
      preemption = preemption_lib.Preemption()
      stack.callback(preemption.close)
    if not config.eval_only:  # evaluation reads a finished run, possibly on a read-only disk
      stack.enter_context(workdir_lib.locked(run.workdir, config.to_json_best_effort(indent=2)))
    ckpt = stack.enter_context(contextlib.closing(checkpointing.Checkpointer(
        run.workdir, config.checkpoint_every_steps, config.keep_checkpoints,
        config.async_checkpoints, read_only=config.eval_only)))
    writable = not config.eval_only or workdir_lib.writable(run.workdir)
    reporter = stack.enter_context(contextlib.closing(
        reporting.Reporter(run.workdir if writable else None, run.total_steps)))

    state, meta = restore_or_initialize(run, ckpt)
    start = int(_host(state.step))
    reporter.message("densenet-jax\n" + reporting.summary_block(
        run.summary(models.count_params(state.params), resumed=bool(meta))))
    image = (config.image_size, config.image_size, run.info.channels)
    eval_step = compilation.compile_step(
        "eval", make_eval_step(run.model, run.mesh), state,
        abstract_batch(run.mesh, run.batches.eval, image, eval_batch=True), say=reporter.message)
    for warning in _resume_warnings(run, meta, start) if meta else []:
      reporter.message(warning)
    if config.eval_only or start >= run.total_steps:
      reporter.message(f"Run already complete at step {start}; evaluating."
                       if start >= run.total_steps else
                       f"Evaluating the checkpoint of step {start} (eval_only).")
      metrics = evaluate(run, state, eval_step)
      # A finished run's final evaluation is already in metrics.jsonl: mark this one a repeat.
      reporter.write(start, "eval" if config.eval_only else "reeval", metrics)
      return state, metrics
    if meta:
      reporter.message(f"Resumed from step {start} of {run.total_steps}.")

    batches = run.train_batches(start)
    # The first batch starts tf.data's threads, which fill its buffers while the step compiles.
    batches = itertools.chain([next(batches)], batches)
    train_step = compilation.compile_step(
        "train", make_train_step(run.model, run.tx, config, run.mesh), state,
        abstract_batch(run.mesh, run.batches.train, image), say=reporter.message)
    preemption.start_training()
    reporter.start(start)
    window, window_start = [], time.time()
    for step, batch in zip(range(start + 1, run.total_steps + 1), batches):
      state, metrics = train_step(state, global_batch(run.mesh, batch))
      window.append(metrics)
      reporter.advance(step)
      if step % config.log_every_steps == 0 or step == run.total_steps:
        reporter.write(step, "train", _window_scalars(run, window, window_start, step,
                                                      ckpt.latest_step()))
        window, window_start = [], time.time()
      stop = preemption.reached(step)
      if stop or ckpt.due(step) or step == run.total_steps:
        ckpt.save(step, state, run.meta())
      if stop:
        preemption.report_stop(step, reporter.message)
        return state, {}
      epoch, into_epoch = divmod(step, run.steps_per_epoch)
      if into_epoch == 0 and epoch % config.eval_every_epochs == 0 and step < run.total_steps:
        reporter.write(step, "eval", evaluate(run, state, eval_step))
    metrics = evaluate(run, state, eval_step)
    reporter.write(run.total_steps, "eval", metrics)
    return state, metrics
