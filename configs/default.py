"""Shared defaults: the paper's CIFAR recipe (section 4.2). Other configs override fields.

Devices: 1, 2, 4, 8, 16, 32, 64 (the global batch of 64 must divide evenly; elsewhere set
batch_size and learning_rate as the error message suggests).
"""

import ml_collections

from densenet_jax import imagenet

CIFAR10_MEAN = (125.3, 123.0, 113.9)  # per-channel, pixel scale 0..255
CIFAR10_STD = (63.0, 62.1, 66.7)
CIFAR100_MEAN = (129.3, 124.1, 112.4)
CIFAR100_STD = (68.2, 65.4, 70.4)
IMAGENET_MEAN = imagenet.MEAN_255
IMAGENET_STD = imagenet.STD_255

# One line per field, shown by `python -m train.main --config ... --print_config`.
HELP = {
    "model": "a densenet_jax preset (densenet_jax.models.list_models())",
    "model_overrides": "keyword overrides of the preset's attributes (depth, growth_rate, ...)",
    "memory_efficient": "recompute concat+BN+ReLU in the backward pass: memory linear in depth",
    "sync_batchnorm": "BatchNorm statistics over the global batch instead of per device",
    "half_precision": "bfloat16 compute; params, BN statistics and the loss stay float32",
    "dataset": "a tensorflow_datasets name (sklearn_digits: the offline demo set)",
    "data_dir": "tfds data directory (None: ~/tensorflow_datasets or $TFDS_DATA_DIR)",
    "download": "let tfds download and prepare the dataset when it is missing",
    "manual_dir": "a folder holding the dataset's original archive(s), for offline staging",
    "train_split": "tfds split to train on (slicing such as 'train[:90%]' works)",
    "eval_split": "tfds split to evaluate on",
    "image_size": "training and evaluation image side in pixels",
    "augment": "'none' | 'cifar' (pad 4, random crop, flip) | 'imagenet' (resized crop, flip)",
    "mean": "per-channel mean subtracted from 0..255 pixels",
    "std": "per-channel std the centred pixels are divided by",
    "shuffle_buffer": "examples per shuffle window (whole 256-example blocks; 2 windows held in RAM)",
    "input_threads": "tf.data threads per host; 0: every core with an accelerator, else 2",
    "batch_size": "global batch over all devices and processes (must divide by the devices)",
    "eval_batch_size": "global eval batch; rounded up to a multiple of the device count",
    "num_epochs": "epochs to train (the lr schedule spans them)",
    "num_train_steps": "-1: num_epochs; > 0: stop after this many steps instead",
    "learning_rate": "peak learning rate (>= 0)",
    "momentum": "SGD momentum (0: plain SGD)",
    "nesterov": "Nesterov momentum",
    "weight_decay": "L2 weight decay added to the gradient (torch-style, every parameter)",
    "lr_schedule": "'piecewise' (paper: x lr_decay at lr_boundaries) | 'cosine'",
    "lr_boundaries": "fractions of training where the piecewise schedule decays",
    "lr_decay": "factor applied at each boundary",
    "warmup_epochs": "linear warmup from 0 over this many epochs",
    "label_smoothing": "label smoothing of the training loss, in [0, 1)",
    "seed": "seeds the initialisation, data order, augmentation and dropout",
    "log_every_steps": "steps between logged training metrics",
    "eval_every_epochs": "epochs between evaluations (and always at the end)",
    "checkpoint_every_steps": "steps between checkpoints (and at the end and on SIGTERM)",
    "keep_checkpoints": "how many of the newest checkpoints to keep",
    "async_checkpoints": "write checkpoints in the background while training goes on",
    "eval_only": "evaluate the newest checkpoint of --workdir without training",
    "init_from": "pretrained weights to start from: a name (densenet121) or a converted .npz",
    "compilation_cache_dir": "JAX's persistent compilation cache, shared by runs on this host "
                             "('' turns it off): a relaunch loads its compiled steps",
}


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
  c.compilation_cache_dir = "~/.cache/densenet_jax/jax_compilation_cache"
  return c
