"""DenseNet-BC (L=100, k=12) on CIFAR-10+: paper Table 2, 4.51% error."""

from configs import default


def get_config():
  """The paper recipe (all defaults)."""
  return default.get_config()
