"""Fine-tune ImageNet-pretrained DenseNet-121 weights on another tfds image dataset (Imagenette).

`init_from` names published weights (downloaded once, hash-verified, cached; see README
"Pretrained ImageNet weights") or points at a `python -m densenet_jax.convert` output:

    python -m train.main --config configs/finetune_densenet121.py --workdir /tmp/ft
    python -m train.main --config configs/finetune_densenet121.py --workdir /tmp/ft \\
        --config.init_from=keras/densenet121   # or a path: --config.init_from=dn121.npz

The classifier is re-initialised when the dataset's class count differs from the checkpoint's.

Devices: 1, 2, 4, 8, 16, 32, 64 (the global batch of 64 must divide evenly; elsewhere set
batch_size and learning_rate as the error message suggests).
"""

from configs import default


def get_config():
  """Imagenette at 224x224, 10 epochs, cosine lr from 0.01 after one warmup epoch."""
  c = default.get_config()
  c.model = "densenet121"
  c.init_from = "densenet121"  # torchvision's weights, torch-free through timm's .safetensors
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
