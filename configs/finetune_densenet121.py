"""Fine-tune ImageNet-pretrained DenseNet-121 weights on another tfds image dataset (Imagenette).

Convert published weights first, then point `init_from` at the result:

    python -m densenet_jax.convert --from torchvision --model densenet121 densenet121.pth dn121.npz
    python -m train.main --config configs/finetune_densenet121.py --workdir /tmp/ft \\
        --config.init_from=dn121.npz

The classifier is re-initialised when the dataset's class count differs from the checkpoint's.

Devices: 1, 2, 4, 8, 16, 32, 64 (the global batch of 64 must divide evenly; elsewhere set
batch_size and learning_rate as the error message suggests).
"""

from configs import default


def get_config():
  """Imagenette at 224x224, 10 epochs, cosine lr from 0.01 after one warmup epoch."""
  c = default.get_config()
  c.model = "densenet121"
  c.init_from = ""  # required: a `python -m densenet_jax.convert` output
  c.dataset = "imagenette/320px-v2"
  c.train_split = "train"
  c.eval_split = "validation"
  c.image_size = 224
  c.augment = "imagenet"
  c.mean, c.std = default.IMAGENET_MEAN, default.IMAGENET_STD
  c.batch_size = 64
  c.eval_batch_size = 128
  c.num_epochs = 10
  c.learning_rate = 0.01
  c.lr_schedule = "cosine"
  c.warmup_epochs = 1.0
  c.half_precision = True
  c.shuffle_buffer = 10_000
  return c
