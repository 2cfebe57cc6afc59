"""DenseNet-BC (L=100, k=12) on SVHN: paper Table 2, 1.76% error.

Devices: 1, 2, 4, 8, 16, 32, 64 (the global batch of 64 must divide evenly; elsewhere set
batch_size and learning_rate as the error message suggests).
"""

from configs import default


def get_config():
  """train+extra, 40 epochs, pixels / 255, no augmentation, dropout 0.2."""
  c = default.get_config()
  c.dataset = "svhn_cropped"
  c.train_split = "train+extra"
  c.augment = "none"
  c.mean, c.std = (0.0,), (255.0,)
  c.model_overrides.drop_rate = 0.2
  c.num_epochs = 40
  c.shuffle_buffer = 100_000
  return c
