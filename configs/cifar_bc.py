"""DenseNet-BC (L=100, k=12) on CIFAR-10+: paper Table 2, 4.51% error.

Devices: 1, 2, 4, 8, 16, 32, 64 (the global batch of 64 must divide evenly; elsewhere set
batch_size and learning_rate as the error message suggests).
"""

from configs import default


def get_config():
  """The paper recipe (all defaults)."""
  return default.get_config()
