"""One train loop: a shard_map'd SGD step over a data-parallel Mesh, orbax resume, metrics."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from flax import traverse_util
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from densenet_jax import models, pretrained
from train import checkpointing, input_pipeline

AXIS = "data"


@flax.struct.dataclass
class TrainState:
  """Everything a bit-exact resume needs; data order and dropout derive from `step` and seed."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 channels: int) -> models.DenseNet:
  """The configured preset with the dataset's classes/channels and the run's numerics."""
  overrides = dict(config.model_overrides)
  overrides.setdefault("num_classes", num_classes)
  overrides.setdefault("in_channels", channels)
  if config.init_from:  # e.g. Keras weights need Keras' BatchNorm epsilon
    overrides.setdefault("bn_epsilon",
                         pretrained.read_checkpoint(config.init_from)[0]["bn_epsilon"])
  return models.get_model(
      config.model,
      dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
      memory_efficient=config.memory_efficient,
      bn_axis_name=AXIS if config.sync_batchnorm else None,
      **overrides)


def warm_start(state: TrainState, path: str, tx: optax.GradientTransformation) -> TrainState:
  """Copies pretrained params and BN statistics into a fresh state (fine-tuning).

  A classifier whose class count differs keeps its fresh initialisation; any other mismatch is
  an error naming the variable, since silently training a half-loaded network wastes a run.
  """
  _, variables, meta = pretrained.load_with_metadata(path)
  loaded = traverse_util.flatten_dict(variables, sep="/")
  fresh = traverse_util.flatten_dict(
      {"params": state.params, "batch_stats": state.batch_stats}, sep="/")
  merged = {}
  for key, value in fresh.items():
    source = loaded.get(key)
    if source is not None and source.shape == value.shape:
      merged[key] = source
    elif key.startswith("params/classifier/") and source is not None:
      logging.warning("init_from: %s is %s in %s but %s here; re-initialising the classifier.",
                      key, source.shape, path, value.shape)
      merged[key] = value
    else:
      raise ValueError(
          f"--config.init_from={path} holds a {meta['model']} whose {key} is "
          f"{None if source is None else source.shape}, but {key} of this run's model is "
          f"{value.shape}. Use a checkpoint of the same architecture (--config.model="
          f"{meta['model']}).")
  variables = traverse_util.unflatten_dict(merged, sep="/")
  return TrainState(step=state.step, params=variables["params"],
                    batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))


def learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int,
                     total_steps: int) -> optax.Schedule:
  """Piecewise-constant (paper) or cosine decay, after an optional linear warmup."""
  warmup = int(config.warmup_epochs * steps_per_epoch)
  if config.lr_schedule == "piecewise":
    main = optax.piecewise_constant_schedule(
        config.learning_rate,
        {int(b * total_steps) - warmup: config.lr_decay for b in config.lr_boundaries})
  elif config.lr_schedule == "cosine":
    main = optax.cosine_decay_schedule(config.learning_rate, max(1, total_steps - warmup))
  else:
    raise ValueError(f"config.lr_schedule must be 'piecewise' or 'cosine', got "
                     f"{config.lr_schedule!r}")
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, config.learning_rate, warmup), main], [warmup])


def create_optimizer(config: ml_collections.ConfigDict,
                     lr_fn: optax.Schedule) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum and torch-style coupled L2 weight decay on every parameter."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(lr_fn, momentum=config.momentum or None, nesterov=config.nesterov))


def make_mesh() -> Mesh:
  """A 1-D data-parallel mesh over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def _cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                   smoothing: float) -> jax.Array:
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def make_train_step(model: models.DenseNet, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, mesh: Mesh
                    ) -> Callable[[TrainState, dict[str, jax.Array]],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted step: each device runs the per-device step on its slice of the global batch."""
  base_key = jax.random.key(config.seed)

  def per_device(state: TrainState, batch: dict[str, jax.Array]):
    key = jax.random.fold_in(jax.random.fold_in(base_key, state.step),
                             jax.lax.axis_index(AXIS))

    def loss_fn(params):
      logits, new_vars = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
          mutable=["batch_stats"], rngs={"dropout": key})
      loss = _cross_entropy(logits, batch["label"], model.num_classes,
                            config.label_smoothing).mean()
      # pmean inside the differentiated function: with check_vma, grad w.r.t. replicated
      # params then equals the global-batch mean gradient (a pmean of grads would not).
      return jax.lax.pmean(loss, AXIS), (logits, new_vars["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Per-device BN statistics are averaged so that replicas never drift.
    batch_stats = jax.lax.pmean(batch_stats, AXIS)
    accuracy = jax.lax.pmean(jnp.mean(jnp.argmax(logits, -1) == batch["label"]), AXIS)
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                           opt_state=opt_state)
    return new_state, {"loss": loss, "accuracy": accuracy, "grad_norm": optax.global_norm(grads)}

  step = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()))
  return jax.jit(step, donate_argnums=0)


def make_eval_step(model: models.DenseNet, mesh: Mesh
                   ) -> Callable[[TrainState, dict[str, jax.Array]], dict[str, jax.Array]]:
  """A jitted step returning global sums of loss, top-1/top-5 hits and real examples."""

  def per_device(state: TrainState, batch: dict[str, jax.Array]):
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         batch["image"], train=False).astype(jnp.float32)
    mask = batch["mask"]
    labels = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    sums = {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum((top5[:, 0] == labels) * mask),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }
    return jax.lax.psum(sums, AXIS)

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P()))


def _host(x: jax.Array) -> np.ndarray:
  """A replicated global array's value on this host (works across processes)."""
  return np.asarray(x.addressable_data(0))


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles every process's local batch into one array sharded over the 'data' axis."""
  sharding = NamedSharding(mesh, P(AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


class Reporter:
  """Process 0 writes metrics to TensorBoard, `<workdir>/metrics.jsonl` and the console."""

  def __init__(self, workdir: epath.Path, total_steps: int):
    self.active = jax.process_index() == 0
    self.total_steps = total_steps
    self.interactive = sys.stdout.isatty()
    self.start = time.time()
    if self.active:
      self.tensorboard = metric_writers.SummaryWriter(str(workdir / "tensorboard"))
      self.jsonl = (workdir / "metrics.jsonl").open("a")

  def write(self, step: int, kind: str, scalars: dict[str, float]) -> None:
    """Records one set of scalars at a step."""
    if not self.active:
      return
    self.tensorboard.write_scalars(step, {f"{kind}/{k}": v for k, v in scalars.items()})
    self.jsonl.write(json.dumps({"step": step, "kind": kind, **scalars}) + "\n")
    self.jsonl.flush()
    text = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
    elapsed = time.time() - self.start
    line = f"[{kind} step {step}/{self.total_steps}] {text}"
    if self.interactive and kind == "train":
      done = step / max(1, self.total_steps)
      bar = "#" * int(30 * done)
      eta = elapsed / max(done, 1e-9) * (1 - done)
      print(f"\r[{bar:<30}] {line} eta {eta:.0f}s", end="", flush=True)
    else:
      print(("\n" if self.interactive else "") + line, flush=True)

  def close(self) -> None:
    """Flushes and closes the writers."""
    if self.active:
      self.tensorboard.close()
      self.jsonl.close()


class _Preemption:
  """Turns SIGTERM into a request to checkpoint and stop at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint and stopping at the next step.")
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether every process should stop now (agreed across processes)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self) -> None:
    """Reinstates the previous SIGTERM handler."""
    signal.signal(signal.SIGTERM, self._previous)


def _check_finite(metrics: dict[str, jax.Array], step: int, last_checkpoint: int | None) -> None:
  """Stops a diverged run before it logs or checkpoints a non-finite state."""
  loss, grad_norm = float(_host(metrics["loss"])), float(_host(metrics["grad_norm"]))
  if not (math.isfinite(loss) and math.isfinite(grad_norm)):
    raise FloatingPointError(
        f"Training diverged at step {step}: loss={loss}, gradient norm={grad_norm}. The last "
        f"checkpoint (step {last_checkpoint}) is kept; lower --config.learning_rate, add "
        f"--config.warmup_epochs, or check the input normalisation, then rerun.")


def _resolve_workdir(workdir: str) -> epath.Path:
  path = epath.Path(workdir)
  if "://" not in workdir:
    path = epath.Path(workdir).expanduser().resolve()  # orbax needs absolute paths
  path.mkdir(parents=True, exist_ok=True)
  return path


def _check_batch_sizes(config: ml_collections.ConfigDict) -> None:
  devices, processes = jax.device_count(), jax.process_count()
  for field in ("batch_size", "eval_batch_size"):
    value = config[field]
    if value <= 0 or value % devices or value % processes:
      raise ValueError(
          f"config.{field}={value} must be a positive multiple of the device count "
          f"({devices} devices over {processes} processes). Try --config.{field}="
          f"{max(devices, value // devices * devices)}.")


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> tuple[TrainState, dict[str, float]]:
  """Trains (or only evaluates, with config.eval_only); returns the state and eval metrics."""
  _check_batch_sizes(config)
  workdir_path = _resolve_workdir(workdir)
  if jax.process_index() == 0:
    (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2))

  builder = input_pipeline.get_builder(config)
  info = input_pipeline.dataset_info(builder, config)
  if config.augment != "imagenet" and info.image_size != (config.image_size,) * 2:
    raise ValueError(
        f"{config.dataset} images are {info.image_size}, but config.image_size="
        f"{config.image_size}: set --config.image_size={info.image_size[0]}, or use "
        f"--config.augment=imagenet to crop and resize.")
  local_batch = config.batch_size // jax.process_count()
  steps_per_epoch = info.num_train // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the {info.num_train} "
                     f"training examples of {config.dataset}:{config.train_split}.")
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else config.num_epochs * steps_per_epoch)

  model = create_model(config, info.num_classes, info.channels)
  lr_fn = learning_rate_fn(config, steps_per_epoch, total_steps)
  tx = create_optimizer(config, lr_fn)
  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())

  def init(rng: jax.Array) -> TrainState:
    shape = (1, config.image_size, config.image_size, info.channels)
    variables = model.init(rng, jnp.zeros(shape, jnp.float32), train=False)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"],
                      opt_state=tx.init(variables["params"]))

  abstract = jax.eval_shape(init, jax.random.key(config.seed))
  abstract = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
  ckpt = checkpointing.Checkpointer(workdir_path, config.checkpoint_every_steps,
                                    config.keep_checkpoints, config.async_checkpoints)
  restored = ckpt.restore(abstract)
  if restored is not None:
    state, meta = restored
    logging.info("Resumed from step %d in %s.", int(_host(state.step)), ckpt.directory)
    if meta.get("seed") != config.seed or meta.get("batch_size") != config.batch_size:
      logging.warning("Checkpoint was written with seed=%s batch_size=%s; this run uses "
                      "seed=%s batch_size=%s, so the data order differs from the original.",
                      meta.get("seed"), meta.get("batch_size"), config.seed, config.batch_size)
  elif config.eval_only:
    raise checkpointing.CheckpointError(
        f"eval_only: no checkpoint in {ckpt.directory}. Train first, or point --workdir at "
        f"a finished run.")
  else:
    # XLA:CPU compiles non-partitionable threefry ~10x faster; the init stream is arbitrary.
    with jax.threefry_partitionable(False):
      state = jax.jit(init, out_shardings=replicated)(jax.random.key(config.seed))
    if config.init_from:
      state = jax.device_put(warm_start(state, config.init_from, tx), replicated)

  eval_step = make_eval_step(model, mesh)
  local_eval_batch = config.eval_batch_size // jax.process_count()
  eval_batches = input_pipeline.eval_batches_needed(info.num_eval, local_eval_batch)

  def evaluate(state: TrainState) -> dict[str, float]:
    totals = None
    for batch in input_pipeline.eval_iterator(builder, config, info.channels,
                                              local_eval_batch, eval_batches):
      sums = eval_step(state, global_batch(mesh, batch))
      totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = jax.tree_util.tree_map(lambda x: float(_host(x)), totals)
    count = totals.pop("count")
    return {"loss": totals["loss"] / count, "accuracy": totals["top1"] / count,
            "top5_accuracy": totals["top5"] / count, "examples": count}

  reporter = Reporter(workdir_path, total_steps)
  step = int(_host(state.step))
  if config.eval_only:
    metrics = evaluate(state)
    reporter.write(step, "eval", metrics)
    reporter.close()
    return state, metrics

  meta = {"seed": config.seed, "batch_size": config.batch_size, "dataset": config.dataset}
  train_step = make_train_step(model, tx, config, mesh)
  batches = input_pipeline.train_iterator(builder, config, local_batch, steps_per_epoch, step)
  preemption = _Preemption()
  history, window_start, window_steps = [], time.time(), 0
  eval_metrics: dict[str, float] = {}
  try:
    while step < total_steps:
      state, metrics = train_step(state, global_batch(mesh, next(batches)))
      step += 1
      history.append(metrics)
      window_steps += 1
      if step % config.log_every_steps == 0 or ckpt.manager.should_save(step):
        _check_finite(metrics, step, ckpt.latest_step())
      if step % config.log_every_steps == 0 or step == total_steps:
        scalars = {k: float(np.mean([_host(m[k]) for m in history])) for k in history[0]}
        seconds = time.time() - window_start
        scalars.update(learning_rate=float(lr_fn(step - 1)),
                       images_per_second=window_steps * config.batch_size / seconds)
        reporter.write(step, "train", scalars)
        history, window_start, window_steps = [], time.time(), 0
      epoch_done = step % steps_per_epoch == 0
      if (epoch_done and (step // steps_per_epoch) % config.eval_every_epochs == 0
          and step != total_steps):
        reporter.write(step, "eval", evaluate(state))
      if preemption.reached(step):
        ckpt.save(step, state, meta, force=True)
        logging.warning("Checkpointed step %d after SIGTERM; exiting.", step)
        break
      ckpt.save(step, state, meta)
    else:
      if ckpt.latest_step() != step:
        ckpt.save(step, state, meta, force=True)
      eval_metrics = evaluate(state)
      reporter.write(step, "eval", eval_metrics)
  finally:
    ckpt.close()
    reporter.close()
    preemption.restore()
  return state, eval_metrics
