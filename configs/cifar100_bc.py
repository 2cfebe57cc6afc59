"""DenseNet-BC (L=100, k=12) on CIFAR-100+: paper Table 2, 22.27% error.

Devices: 1, 2, 4, 8, 16, 32, 64 (the global batch of 64 must divide evenly; elsewhere set
batch_size and learning_rate as the error message suggests).
"""

from configs import default


def get_config():
  """CIFAR-100 with augmentation and CIFAR-100 statistics."""
  c = default.get_config()
  c.dataset = "cifar100"
  c.mean, c.std = default.CIFAR100_MEAN, default.CIFAR100_STD
  return c
