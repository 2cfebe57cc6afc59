"""DenseNet-121 on ImageNet (tfds imagenet2012): paper Table 3, 25.02% top-1 error.

Devices: 1, 2, 4, 8, 16, 32, 64, 128, 256 (a v4-32 has 16 chips; the eval batch of 250 is
rounded up to a multiple of the device count, padding masked).
"""

from configs import default


def get_config():
  """Batch 256, 90 epochs, lr 0.1 / 10 at epochs 30 and 60, bf16 compute."""
  c = default.get_config()
  c.model = "densenet121"
  c.dataset = "imagenet2012"
  c.eval_split = "validation"
  c.image_size = 224
  c.augment = "imagenet"
  c.mean, c.std = default.IMAGENET_MEAN, default.IMAGENET_STD
  c.batch_size = 256
  c.eval_batch_size = 250
  c.num_epochs = 90
  c.lr_boundaries = (30 / 90, 60 / 90)
  c.half_precision = True
  c.shuffle_buffer = 16_384
  c.log_every_steps = 500
  c.checkpoint_every_steps = 5000
  return c
