"""The training step and everything it is built from: state, model, optimizer, loss, mesh.

Needs only jax, flax and optax (and densenet_jax): no TensorFlow, tfds, clu or ml_collections,
so the step builds and benchmarks on any machine with an accelerator (those lent to this project
have jax, flax, optax and orbax, and no network to install more).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from densenet_jax import backends, models
from train import errors

if TYPE_CHECKING:
  import ml_collections

AXIS = "data"


@flax.struct.dataclass
class TrainState:
  """Everything a bit-exact resume needs; data order and dropout derive from `step` and seed."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy of integer `labels` in float32 (optax), with
  `label_smoothing` a putting 1 - a + a/K on the label and a/K on each of the K classes."""
  logits = logits.astype(jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def create_model(config: ml_collections.ConfigDict, num_classes: int, channels: int,
                 platform: str | None = None, bn_epsilon: float | None = None
                 ) -> models.DenseNet:
  """The configured preset with the dataset's classes/channels, the run's numerics and the
  BatchNorm epsilon of the weights it starts from (Keras' differs from torchvision's), unless
  the overrides set them. The model takes the fast path of the platform it is compiled for,
  or of `platform` where one is given (a comparison of the backends' choices)."""
  overrides = dict(config.model_overrides)
  if platform is not None:
    for name, value in backends.fast_path(platform).model_choices().items():
      overrides.setdefault(name, value)
  overrides.setdefault("num_classes", num_classes)
  overrides.setdefault("in_channels", channels)
  if bn_epsilon is not None:
    overrides.setdefault("bn_epsilon", bn_epsilon)
  return models.get_model(
      config.model,
      dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
      memory_efficient=config.memory_efficient,
      bn_axis_name=AXIS if config.sync_batchnorm else None,
      **overrides)


def create_train_state(model: models.DenseNet, tx: optax.GradientTransformation,
                       input_shape: tuple[int, ...], rng: jax.Array) -> TrainState:
  """A freshly initialised state (step 0) for inputs of `input_shape` (NHWC, any batch)."""
  variables = model.init(rng, jnp.zeros((1, *input_shape[1:]), jnp.float32), train=False)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))


def warm_start(state: TrainState, variables: Any, meta: dict[str, Any], path: str,
               tx: optax.GradientTransformation) -> TrainState:
  """Copies pretrained params and BN statistics (`variables` of the checkpoint at `path`, from
  `pretrained.load_with_metadata`) into a fresh state (fine-tuning).

  A classifier whose class count differs keeps its fresh initialisation; any other mismatch is
  an error naming the variable, since silently training a half-loaded network wastes a run.
  """
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
      raise errors.ConfigError(
          f"--config.init_from={path} holds a {meta['model']} whose {key} is "
          f"{None if source is None else source.shape}, but {key} of this run's model is "
          f"{value.shape}. Use a checkpoint of the same architecture (--config.model="
          f"{meta['model']}).")
  variables = traverse_util.unflatten_dict(merged, sep="/")
  return TrainState(step=state.step, params=variables["params"],
                    batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))


def lr_boundaries(config: ml_collections.ConfigDict, total_steps: int) -> list[int]:
  """The steps at which the piecewise schedule multiplies the learning rate by lr_decay."""
  return [int(b * total_steps) for b in config.lr_boundaries]


def warmup_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The steps of the linear warmup."""
  return int(config.warmup_epochs * steps_per_epoch)


def learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int,
                     total_steps: int) -> optax.Schedule:
  """Piecewise-constant (paper) or cosine decay, after an optional linear warmup."""
  warmup = warmup_steps(config, steps_per_epoch)
  if config.lr_schedule == "piecewise":
    main = optax.piecewise_constant_schedule(
        config.learning_rate,
        {b - warmup: config.lr_decay for b in lr_boundaries(config, total_steps)})
  else:
    main = optax.cosine_decay_schedule(config.learning_rate, max(1, total_steps - warmup))
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


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh over `devices` (default: every device of every process).

  The planner passes the devices of a TPU topology that is not attached (train.plan).
  """
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def abstract_train_state(model: models.DenseNet, tx: optax.GradientTransformation,
                         input_shape: tuple[int, ...], mesh: Mesh, seed: int) -> TrainState:
  """The train state's shapes, dtypes and (replicated) shardings, computing nothing."""
  replicated = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
      jax.eval_shape(lambda rng: create_train_state(model, tx, input_shape, rng),
                     jax.random.key(seed)))


def abstract_batch(mesh: Mesh, batch_size: int, image_shape: tuple[int, ...],
                   eval_batch: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the input pipeline feeds (`global_batch`), as sharded shapes."""
  sharding = NamedSharding(mesh, P(AXIS))
  batch = {"image": jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32,
                                         sharding=sharding),
           "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding)}
  if eval_batch:
    batch["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32, sharding=sharding)
  return batch


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
      loss = cross_entropy(logits, batch["label"], config.label_smoothing).mean()
      # pmean inside the differentiated function: with check_vma, grad w.r.t. replicated
      # params then equals the global-batch mean gradient (a pmean of grads would not).
      return jax.lax.pmean(loss, AXIS), (logits, new_vars["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Per-device BN statistics are averaged so that replicas never drift.
    batch_stats = jax.lax.pmean(batch_stats, AXIS)
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                           opt_state=opt_state)
    accuracy = jax.lax.pmean(jnp.mean(jnp.argmax(logits, -1) == batch["label"]), AXIS)
    return new_state, {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}

  step = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()))
  return jax.jit(step, donate_argnums=0,
                 compiler_options=backends.fast_path(mesh.devices.flat[0].platform).compiler_options)


def make_eval_step(model: models.DenseNet, mesh: Mesh
                   ) -> Callable[[TrainState, dict[str, jax.Array]], dict[str, jax.Array]]:
  """A jitted step returning global sums over the real examples of one batch (mask 1): loss,
  top-1 and top-5 hits, and their count."""

  def per_device(state: TrainState, batch: dict[str, jax.Array]):
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         batch["image"], train=False).astype(jnp.float32)
    labels, mask = batch["label"], batch["mask"]
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    sums = {"loss": jnp.sum(cross_entropy(logits, labels) * mask),
            "top1": jnp.sum((top5[:, 0] == labels) * mask),
            "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
            "count": jnp.sum(mask)}
    return jax.lax.psum(sums, AXIS)

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P()))


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles every process's local batch into one array sharded over the 'data' axis."""
  sharding = NamedSharding(mesh, P(AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
