"""Shared defaults: the paper's CIFAR recipe (section 4.2). Other configs override fields."""

import ml_collections

CIFAR10_MEAN = (125.3, 123.0, 113.9)  # per-channel, pixel scale 0..255
CIFAR10_STD = (63.0, 62.1, 66.7)
CIFAR100_MEAN = (129.3, 124.1, 112.4)
CIFAR100_STD = (68.2, 65.4, 70.4)
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def get_config() -> ml_collections.ConfigDict:
  """DenseNet-BC-100 (k=12) on CIFAR-10+ with the paper's recipe."""
  c = ml_collections.ConfigDict()
  # Model: a densenet_jax preset and keyword overrides of its attributes.
  c.model = "densenet_bc_100"
  c.model_overrides = ml_collections.ConfigDict({"drop_rate": 0.0})
  c.memory_efficient = False
  c.sync_batchnorm = False  # True: BatchNorm statistics over the global batch
  c.half_precision = False  # bf16 compute; params, BN statistics and loss stay float32

  # Data (tensorflow_datasets).
  c.dataset = "cifar10"
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.download = True
  c.manual_dir = ml_collections.FieldReference(None, field_type=str)
  c.train_split = "train"
  c.eval_split = "test"
  c.image_size = 32
  c.augment = "cifar"  # 'none' | 'cifar' (pad 4, crop, flip) | 'imagenet' (resized crop, flip)
  c.mean = CIFAR10_MEAN  # subtracted from 0..255 pixels; set to (0,) and std (255,) for /255
  c.std = CIFAR10_STD
  c.shuffle_buffer = 50_000
  c.input_threads = 0  # tf.data threads per host; 0: every core if an accelerator is present, else 2

  # Optimisation: SGD, Nesterov momentum 0.9, weight decay 1e-4, lr 0.1 / 10 at 50% and 75%.
  c.batch_size = 64  # global, over all devices and processes
  c.eval_batch_size = 500
  c.num_epochs = 300
  c.num_train_steps = -1  # > 0: stop after this many steps (smoke tests)
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 1e-4
  c.lr_schedule = "piecewise"  # 'piecewise' | 'cosine'
  c.lr_boundaries = (0.5, 0.75)  # fractions of training (piecewise)
  c.lr_decay = 0.1
  c.warmup_epochs = 0.0
  c.label_smoothing = 0.0

  # Bookkeeping.
  c.seed = 0
  c.log_every_steps = 100
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.async_checkpoints = True  # write checkpoints in the background while training goes on
  c.eval_only = False
  c.init_from = ""  # a `python -m densenet_jax.convert` checkpoint to start from (fine-tuning)
  return c
