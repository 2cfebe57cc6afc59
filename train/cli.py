"""Command-line plumbing shared by `train.main` and `train.plan`: flags that fail in one line."""

from __future__ import annotations

import re
import sys

from absl import flags


def parse_flags(argv: list[str], doc: str) -> list[str]:
  """absl flag parsing whose errors (a typo in a config field, say) are one clean line.

  `--help` prints `doc` and the flags; usage errors exit 2.
  """
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if any(a in ("-h", "--help", "-?") for a in argv[1:]):
    print(doc.strip() + "\n\nflags:\n" + FLAGS.main_module_help())
    sys.exit(0)
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    text = str(e)
    if isinstance(e, (AttributeError, KeyError)):  # ml_collections: no such field
      raw = str(e.args[0] if e.args else e)
      name = re.search(r"\w+", raw)
      hint = re.search(r"Did you mean.*", raw.replace("\\n", "\n"))
      text = (f"no config field '{name.group(0) if name else raw}'. "
              f"{hint.group(0).rstrip(chr(39)) if hint else ''}").strip()
    print(f"error: {text}\nSee the fields with --print_config, the flags with --help.",
          file=sys.stderr)
    sys.exit(2)
