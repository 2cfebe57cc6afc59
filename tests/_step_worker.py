"""Runs two real train steps on a fixed global batch and saves the result (device count from
XLA_FLAGS); tests compare runs with different device counts."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import default
from train import train


def main(out_path: str) -> None:
  jax.config.update("jax_threefry_partitionable", False)
  config = default.get_config()
  config.model_overrides = {"depth": 10, "growth_rate": 4}
  config.sync_batchnorm = True
  config.seed = 3
  model = train.create_model(config, num_classes=10, channels=3)
  tx = train.create_optimizer(config, train.learning_rate_fn(config, 10, 100))
  mesh = train.make_mesh()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=tx.init(variables["params"]))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  step = train.make_train_step(model, tx, config, mesh)
  rng = np.random.default_rng(0)
  for _ in range(2):
    batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 10, size=(16,))}
    state, metrics = step(state, train.global_batch(mesh, batch))
  leaves = jax.tree_util.tree_leaves_with_path(
      {"params": state.params, "batch_stats": state.batch_stats})
  arrays = {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}
  arrays["loss"] = np.asarray(metrics["loss"])
  np.savez(out_path, devices=jax.device_count(), **arrays)


if __name__ == "__main__":
  main(sys.argv[1])
