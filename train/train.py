"""One train loop: validate, restore or initialise, train with verified checkpoints, evaluate.

`train_and_evaluate` reads as flax's examples/imagenet: `prepare` (config, devices, dataset,
model), `restore_or_initialize`, `_train_loop`, `evaluate`. The step itself lives in
`train.step`. TensorFlow/tfds (the input pipeline) and clu (TensorBoard) are imported where data
is read and metrics are written.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from densenet_jax import models
from train import (checkpointing, compilation, errors, preemption as preemption_lib, validation,
                   workdir as workdir_lib)
from train.step import (TrainState, abstract_batch, abstract_train_state, create_model,
                        create_optimizer, create_train_state, global_batch, learning_rate_fn,
                        lr_boundaries, make_eval_step, make_mesh, make_train_step, warm_start,
                        warmup_steps)

if TYPE_CHECKING:
  import ml_collections
  from train import input_pipeline, reporting

_host = checkpointing.host_value


@dataclasses.dataclass
class Run:
  """What one launch of the trainer works with, resolved from the config and the dataset."""

  config: ml_collections.ConfigDict
  workdir: epath.Path
  builder: Any
  info: input_pipeline.DatasetInfo
  batches: validation.Batches
  steps_per_epoch: int
  total_steps: int
  model: models.DenseNet
  lr_fn: optax.Schedule
  tx: optax.GradientTransformation
  mesh: Mesh

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


def prepare(config: ml_collections.ConfigDict, workdir: epath.Path) -> Run:
  """Validates the config against itself, the devices and the dataset; builds the model."""
  validation.validate(config)
  batches = validation.batches(config, jax.device_count(), jax.process_count())
  from train import input_pipeline  # pylint: disable=g-import-not-at-top
  builder = input_pipeline.get_builder(config)
  info = input_pipeline.dataset_info(builder, config)
  if config.augment != "imagenet" and info.image_size != (config.image_size,) * 2:
    raise errors.ConfigError(
        f"{config.dataset} images are {info.image_size}, but config.image_size="
        f"{config.image_size}: set --config.image_size={info.image_size[0]}, or use "
        f"--config.augment=imagenet to crop and resize.")
  steps_per_epoch, total_steps = validation.run_length(config, info.num_train)
  try:
    model = create_model(config, info.num_classes, info.channels)
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f"Cannot build --config.model={config.model} for "
                             f"{config.dataset}: {e}") from e
  lr_fn = learning_rate_fn(config, steps_per_epoch, total_steps)
  return Run(config=config, workdir=workdir, builder=builder, info=info, batches=batches,
             steps_per_epoch=steps_per_epoch, total_steps=total_steps, model=model,
             lr_fn=lr_fn, tx=create_optimizer(config, lr_fn), mesh=make_mesh())


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
  if config.init_from:
    state = jax.device_put(warm_start(state, config.init_from, run.tx), replicated)
  return state, None


def evaluate(run: Run, state: TrainState,
             eval_step: Callable[[TrainState, dict[str, jax.Array]], dict[str, jax.Array]]
             ) -> dict[str, float]:
  """Loss, top-1 and top-5 accuracy over the whole eval split (padding masked out)."""
  from train import input_pipeline  # pylint: disable=g-import-not-at-top
  num_batches = input_pipeline.eval_batches_needed(run.info.num_eval, run.batches.local_eval)
  totals = None
  for batch in input_pipeline.eval_iterator(run.builder, run.config, run.info.channels,
                                            run.batches.local_eval, num_batches):
    sums = eval_step(state, global_batch(run.mesh, batch))
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
  totals = jax.tree_util.tree_map(lambda x: float(_host(x)), totals)
  count = totals.pop("count")
  return {"loss": totals["loss"] / count, "accuracy": totals["top1"] / count,
          "top5_accuracy": totals["top5"] / count, "examples": count}


def _summary(run: Run, state: TrainState, resumed: bool) -> list[tuple[str, Any]]:
  c, info, b = run.config, run.info, run.batches
  params = models.count_params(state.params)
  overrides = ", ".join(f"{k}={v}" for k, v in dict(c.model_overrides).items())
  s = run.schedule()
  schedule = (f"{c.lr_schedule}, lr {c.learning_rate:g}" +
              (f" x{c.lr_decay:g} at steps {s['boundaries']}" if s["boundaries"] else "") +
              (f", {s['warmup_steps']} warmup steps" if s["warmup_steps"] else ""))
  devices = jax.device_count()
  eval_note = (f" ({c.eval_batch_size} rounded up to {devices} devices; padding is masked)"
               if b.eval != c.eval_batch_size else "")
  return [
      ("model", f"{c.model}" + (f" ({overrides})" if overrides else "") +
       f", {params:,} parameters, {'bfloat16' if c.half_precision else 'float32'}"),
      ("data", f"{c.dataset}: {info.num_train:,} train ({c.train_split}) / {info.num_eval:,} "
               f"eval ({c.eval_split}), {info.num_classes} classes, augment={c.augment}"),
      ("devices", f"{jax.process_count()} process(es) x {jax.local_device_count()} "
                  f"{jax.default_backend()} device(s) = {devices}"),
      ("batch", f"{b.train} global, {b.local_train} per process, {b.train // devices} per "
                f"device; eval {b.eval}{eval_note}"),
      ("steps", f"{run.steps_per_epoch} per epoch, {run.total_steps} in total"),
      ("schedule", schedule),
      ("workdir", f"{run.workdir}" + (" (resumed)" if resumed else "")),
  ]


def _schedule_change(run: Run, old: dict[str, Any] | None, step: int) -> str | None:
  new = checkpointing.json_round_trip(run.schedule())
  if not old or old == new:
    return None
  new_lr = float(run.lr_fn(step))
  return (f"The learning-rate schedule differs from the one this checkpoint was trained with: "
          f"total steps {old.get('total_steps')} -> {run.total_steps}, boundaries "
          f"{old.get('boundaries')} -> {new['boundaries']}, base lr "
          f"{old.get('learning_rate')} -> {run.config.learning_rate}. The run continues on the "
          f"schedule of the current config, as a fresh run with it would: lr {new_lr:.4g} from "
          f"step {step}. Rerun with the original values to keep the original schedule.")


def _check_finite(metrics: dict[str, jax.Array], step: int, last_checkpoint: int | None) -> None:
  """Stops a diverged run before it logs or checkpoints a non-finite state."""
  loss, grad_norm = float(_host(metrics["loss"])), float(_host(metrics["grad_norm"]))
  if not (math.isfinite(loss) and math.isfinite(grad_norm)):
    raise errors.DivergedError(
        f"Training diverged at step {step}: loss={loss}, gradient norm={grad_norm}; "
        f"{checkpointing.newest_text(last_checkpoint)}. {errors.DIVERGENCE_FIX}")


def _acquire_lock(path: epath.Path) -> workdir_lib.Lock | None:
  """Process 0 locks the workdir; every process learns whether it succeeded."""
  lock, failure = None, None
  if jax.process_index() == 0:
    workdir_lib.create(path)
    lock = workdir_lib.Lock(path)
    try:
      lock.acquire()
    except errors.WorkdirError as e:
      failure, lock = e, None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    ok = multihost_utils.broadcast_one_to_all(np.int32(failure is None))
    if not ok and failure is None:
      failure = errors.WorkdirError(f"Process 0 could not lock --workdir={path}; see its log.")
  if failure is not None:
    raise failure
  return lock


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       preemption: preemption_lib.Preemption | None = None
                       ) -> tuple[TrainState, dict[str, float]]:
  """Trains (or only evaluates, with config.eval_only); returns the state and eval metrics."""
  own_preemption = preemption is None
  preemption = preemption or preemption_lib.Preemption()
  path = workdir_lib.resolve(workdir)
  lock = None
  try:
    run = prepare(config, path)
    compilation.enable_cache(config.get("compilation_cache_dir", ""))
    if not config.eval_only:  # evaluation reads a finished run, possibly on a read-only disk
      lock = _acquire_lock(path)
      if jax.process_index() == 0:
        workdir_lib.write_config(path, config.to_json_best_effort(indent=2))
    return _train_and_evaluate(run, preemption)
  finally:
    if lock is not None:
      lock.release()
    if own_preemption:
      preemption.close()


def _train_and_evaluate(run: Run, preemption: preemption_lib.Preemption
                        ) -> tuple[TrainState, dict[str, float]]:
  from train import input_pipeline, reporting  # pylint: disable=g-import-not-at-top
  config = run.config
  ckpt = checkpointing.Checkpointer(run.workdir, config.checkpoint_every_steps,
                                    config.keep_checkpoints, config.async_checkpoints,
                                    read_only=config.eval_only)
  writable = not config.eval_only or _writable(run.workdir)
  reporter = reporting.Reporter(run.workdir if writable else None, run.total_steps)
  try:
    state, meta = restore_or_initialize(run, ckpt)
    step = int(_host(state.step))
    reporter.message("densenet-jax\n" + reporting.summary_block(_summary(run, state, bool(meta))))
    image = (config.image_size, config.image_size, run.info.channels)
    eval_step = compilation.compile_step(
        "eval", make_eval_step(run.model, run.mesh), state,
        abstract_batch(run.mesh, run.batches.eval, image, eval_batch=True), say=reporter.message)
    if meta is not None:
      if meta.get("seed") != config.seed or meta.get("batch_size") != config.batch_size:
        reporter.message(
            f"Warning: the checkpoint was written with seed={meta.get('seed')} batch_size="
            f"{meta.get('batch_size')}; this run uses seed={config.seed} batch_size="
            f"{config.batch_size}, so the data order differs from the original run.")
      change = _schedule_change(run, meta.get("schedule"), step)
      if change and step < run.total_steps and not config.eval_only:
        reporter.message("Warning: " + change)
    if config.eval_only or step >= run.total_steps:
      reporter.message(f"Run already complete at step {step}; evaluating." if step >= run.total_steps
                       else f"Evaluating the checkpoint of step {step} (eval_only).")
      metrics = evaluate(run, state, eval_step)
      # A finished run's final evaluation is already in metrics.jsonl: mark this one a repeat.
      reporter.write(step, "eval" if config.eval_only else "reeval", metrics)
      return state, metrics
    if meta is not None:
      reporter.message(f"Resumed from step {step} of {run.total_steps}.")
    return _train_loop(run, state, step, ckpt, reporter, preemption, eval_step, input_pipeline)
  finally:
    ckpt.close()
    reporter.close()


def _writable(path: epath.Path) -> bool:
  try:
    probe = path / f".write_probe_{jax.process_index()}"
    probe.write_text("")
    probe.unlink()
    return True
  except OSError:
    return False


def _train_loop(run: Run, state: TrainState, step: int, ckpt: checkpointing.Checkpointer,
                reporter: reporting.Reporter, preemption: preemption_lib.Preemption,
                eval_step: Callable[..., Any], input_pipeline: Any
                ) -> tuple[TrainState, dict[str, float]]:
  """Steps from `step` to the end (or a preemption), logging, evaluating and checkpointing."""
  config, meta = run.config, run.meta()
  batches = input_pipeline.train_iterator(run.builder, config, run.batches.local_train,
                                          run.steps_per_epoch, step)
  batch = global_batch(run.mesh, next(batches))
  train_step = compilation.compile_step(
      "train", make_train_step(run.model, run.tx, config, run.mesh), state, batch,
      say=reporter.message)
  preemption.start_training()
  reporter.start(step)
  history, window_start, window_steps = [], time.time(), 0
  while step < run.total_steps:
    state, metrics = train_step(state, batch)
    step += 1
    history.append(metrics)
    window_steps += 1
    reporter.advance(step)
    if step % config.log_every_steps == 0 or step == run.total_steps:
      _check_finite(metrics, step, ckpt.latest_step())
      scalars = {k: float(np.mean([_host(m[k]) for m in history])) for k in history[0]}
      scalars.update(learning_rate=float(run.lr_fn(step - 1)),
                     images_per_second=window_steps * config.batch_size /
                     (time.time() - window_start))
      reporter.write(step, "train", scalars)
      history, window_start, window_steps = [], time.time(), 0
    stop = preemption.reached(step)
    if stop or ckpt.due(step) or step == run.total_steps:
      ckpt.save(step, state, meta)
    if stop:
      preemption.report_stop(step, reporter.message)
      return state, {}
    if step < run.total_steps:
      if step % run.steps_per_epoch == 0 and (
          step // run.steps_per_epoch) % config.eval_every_epochs == 0:
        reporter.write(step, "eval", evaluate(run, state, eval_step))
      batch = global_batch(run.mesh, next(batches))
  metrics = evaluate(run, state, eval_step)
  reporter.write(step, "eval", metrics)
  return state, metrics
