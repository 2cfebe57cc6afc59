"""Runs two real train steps on a fixed global batch and saves the result (device count from
XLA_FLAGS; dense blocks concatenating or as one buffer, from argv); tests compare runs with
different device counts and block forms."""

import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import default
from train import step as train


def main(out_path: str, block_buffer: str) -> None:
  config = default.get_config()
  config.model_overrides = {"depth": 10, "growth_rate": 4, "block_buffer": block_buffer == "buffer"}
  config.sync_batchnorm = True
  config.seed = 3
  model = train.create_model(config, num_classes=10, channels=3)
  tx = train.create_optimizer(config, train.learning_rate_fn(config, 10, 100))
  mesh = train.make_mesh()
  state = jax.jit(lambda rng: train.create_train_state(model, tx, (16, 16, 16, 3), rng),
                  out_shardings=NamedSharding(mesh, P()))(jax.random.key(0))
  step = train.make_train_step(model, tx, config, mesh)
  rng = np.random.default_rng(0)
  for _ in range(2):
    batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 10, size=(16,)).astype(np.int32)}
    state, metrics = step(state, train.global_batch(mesh, batch))
  leaves = jax.tree_util.tree_leaves_with_path(
      {"params": state.params, "batch_stats": state.batch_stats})
  arrays = {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}
  arrays["loss"] = np.asarray(metrics["loss"])
  np.savez(out_path, devices=jax.device_count(), **arrays)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
