"""DenseNet-BC (L=100, k=12) on CIFAR-100+: paper Table 2, 22.27% error."""

from configs import default


def get_config():
  """CIFAR-100 with augmentation and CIFAR-100 statistics."""
  c = default.get_config()
  c.dataset = "cifar100"
  c.mean, c.std = default.CIFAR100_MEAN, default.CIFAR100_STD
  return c
