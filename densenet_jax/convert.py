"""Converts torchvision or keras.applications DenseNet weights into a densenet-jax checkpoint.

    python -m densenet_jax.convert --from torchvision --model densenet121 \
        densenet121-a639ec97.pth densenet121.npz
    python -m densenet_jax.convert --from keras --model densenet121 \
        densenet121_weights_tf_dim_ordering_tf_kernels.h5 densenet121_keras.npz

Every tensor is checked by name and shape against the model before anything is written;
read the result with `densenet_jax.pretrained.load(OUT)`. Published weights need no manual
conversion: `pretrained.load("densenet121")` downloads, verifies and converts them once.
"""

from __future__ import annotations

import argparse
import sys

from densenet_jax import models, pretrained


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  """The command line: --from, --model, IN, OUT."""
  parser = argparse.ArgumentParser(
      prog="python -m densenet_jax.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("--from", dest="source", required=True, choices=pretrained.SOURCES,
                      help="framework the weights come from")
  parser.add_argument("--model", choices=models.list_models(), default=None,
                      help="the preset the weights belong to (default: inferred from the "
                           "file's block layout)")
  parser.add_argument("weights", metavar="IN",
                      help="torchvision .pth/.pt (needs torch), .safetensors or .npz "
                           "state_dict; or Keras .weights.h5, legacy .h5 or .keras")
  parser.add_argument("out", metavar="OUT", help="the checkpoint to write (.npz)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  """Runs the conversion; bad input ends with a one-paragraph error, not a traceback.

  Exit status: 0 done, 2 a bad argument or input file, 1 a missing package.
  """
  args = parse_args(argv)
  try:
    metadata = pretrained.convert(args.source, args.weights, args.out, args.model)
  except ImportError as e:  # the message names the extra to install
    print(f"convert: error: {e}", file=sys.stderr)
    return 1
  except (ValueError, OSError) as e:
    print(f"convert: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}: {metadata['model']} from {metadata['source']} "
        f"({metadata['source_file']}), {metadata['num_classes']} classes, "
        f"bn_epsilon {metadata['bn_epsilon']:g}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
