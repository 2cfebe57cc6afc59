"""Command-line plumbing shared by `train.main` and `train.plan`: flags that fail in one line."""

from __future__ import annotations

import ast
import contextlib
import os
import re
import sys
from typing import Any, Iterator

from absl import flags

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@contextlib.contextmanager
def stderr_to(path: str) -> Iterator[None]:
  """Sends file descriptor 2 to `path`: C++ libraries (TF, libtpu) print start-up noise there."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(path, "w") as sink:
      os.dup2(sink.fileno(), 2)
      yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def shipped_configs(configs_dir: str) -> str:
  """'configs:' and one line per configs/*.py: its path and its docstring's first line."""
  rows = []
  for name in sorted(os.listdir(configs_dir)):
    if not name.endswith(".py") or name.startswith("_"):
      continue
    path = os.path.join(configs_dir, name)
    try:
      with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError, ValueError):
      doc = ""
    rows.append((f"configs/{name}", doc.strip().splitlines()[0] if doc.strip() else ""))
  if not rows:
    return ""
  width = max(len(path) for path, _ in rows)
  return "configs:\n" + "\n".join(f"  {path:<{width}}  {doc}".rstrip() for path, doc in rows)


def describe_config(config: Any) -> str:
  """Every field of `config`, its value and its one-line meaning (configs/default.py HELP)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  lines = []
  flat = {}

  def walk(prefix, node):
    for key in node.keys():
      value = node[key]
      if hasattr(value, "keys") and key != "model_overrides":
        walk(f"{prefix}{key}.", value)
      else:
        flat[prefix + key] = value.to_dict() if hasattr(value, "to_dict") else value

  walk("", config)
  for key, value in flat.items():
    lines.append(f"{f'{key} = {value!r}':<44}  # {default.HELP.get(key, '')}".rstrip(" #"))
  return "\n".join(lines)


def _config_load_error(FLAGS, error: BaseException | None = None) -> str | None:  # pylint: disable=invalid-name
  """Why a config file could not be loaded, if one could not: ml_collections defers that error
  to the first access of the config (deep inside a run, as two tracebacks), or raises it while
  applying a --config.FIELD override."""
  texts = [str(error)] if error is not None and re.search(
      "Failed loading config file|earlier failure to load", str(error)) else []
  for name in FLAGS:
    value = FLAGS[name].value
    if type(value).__name__ == "_ErrorConfig":
      texts.append(str(object.__getattribute__(value, "_error")))
  for text in texts:
    found = re.search(r"\[Errno \d+\] ([^:\n]+)(?:: '([^'\n]+)')?", text)
    if found:
      return (f"cannot load the config file {found.group(2) or ''}: {found.group(1)}. Pass a "
              f"config file such as configs/cifar_bc.py (--help lists them).").replace(" :", ":")
    return f"{text.splitlines()[-1].strip()}. Pass a config file such as configs/cifar_bc.py."
  return None


def require_config(config: Any) -> None:
  """Exits 2 with one line unless --config named a config file (both programs need one)."""
  if config is None:
    print("error: --config is required, e.g. --config configs/cifar_bc.py.", file=sys.stderr,
          flush=True)
    sys.exit(2)


def parse_flags(argv: list[str], doc: str, configs_dir: str = CONFIGS) -> list[str]:
  """absl flag parsing whose errors (a typo in a config field, say) are one clean line.

  `--help` prints `doc`, the shipped configs (those in `configs_dir`) and the flags; usage
  errors exit 2.
  """
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if any(a in ("-h", "--help", "-?") for a in argv[1:]):
    configs = shipped_configs(configs_dir) if os.path.isdir(configs_dir) else ""
    try:
      print(doc.strip() + ("\n\n" + configs if configs else "") + "\n\nflags:\n" +
            FLAGS.main_module_help(), flush=True)
    except BrokenPipeError:  # `--help | head`
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
  try:
    remaining = FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    text = _config_load_error(FLAGS, e)  # a missing file makes its overrides unknown flags
    if text is not None:
      print(f"error: {text}", file=sys.stderr)
      sys.exit(2)
    text = str(e)
    if isinstance(e, (AttributeError, KeyError)):  # ml_collections: no such field
      raw = str(e.args[0] if e.args else e)
      name = re.search(r"\w+", raw)
      hint = re.search(r"Did you mean.*", raw.replace("\\n", "\n"))
      text = (f"no config field '{name.group(0) if name else raw}'. "
              f"{hint.group(0).rstrip(chr(39)) if hint else ''}").strip()
    see = "the fields with --print_config, " if "print_config" in FLAGS else ""
    print(f"error: {text}\nSee {see}the flags with --help.", file=sys.stderr)
    sys.exit(2)
  text = _config_load_error(FLAGS)
  if text is not None:
    print(f"error: {text}", file=sys.stderr)
    sys.exit(2)
  return remaining
