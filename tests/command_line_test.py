"""The command line's contract: usage errors exit 2 in one line, --help lists the shipped configs."""

import ast
import subprocess
import sys

import pytest

from train import cli
from train_test import REPO

CONFIGS = sorted(p for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")


def main(*args):
  return subprocess.run([sys.executable, "-m", "train.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, says", [
    (["--config", "configs/nope.py", "--workdir", "/tmp/x"],
     "cannot load the config file configs/nope.py: No such file or directory"),
    (["--config", "configs/nope.py", "--workdir", "/tmp/x", "--config.model_overrides.depth=10"],
     "cannot load the config file configs/nope.py: No such file or directory"),
    (["--config", "configs", "--workdir", "/tmp/x"],
     "cannot load the config file configs: Is a directory"),
    (["--config", "configs/digits_bc.py"], "--workdir is required"),
    (["--config", "configs/digits_bc.py", "--workdir=/tmp/x", "stray"],
     "unexpected arguments stray"),
    (["--config", "configs/digits_bc.py", "--workdir=/tmp/x", "--config.bogus=1"],
     "no config field 'bogus'"),
    (["--config", "configs/digits_bc.py", "--workdir=/tmp/x", "--coordinator_address=1.2.3.4:5"],
     "--coordinator_address needs --num_processes and --process_id"),
])
def test_usage_errors_exit_2_in_one_message_without_a_traceback(args, says):
  result = main(*args)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.startswith("error: ") and says in result.stderr.splitlines()[0]
  assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) <= 2


def test_help_lists_every_shipped_config_with_its_purpose():
  result = main("--help")
  assert result.returncode == 0
  head = result.stdout.split("\nflags:\n")[0]
  for path in CONFIGS:
    purpose = ast.get_docstring(ast.parse(path.read_text())).splitlines()[0]
    assert any(l.split() and l.split()[0] == f"configs/{path.name}" and l.endswith(purpose)
               for l in head.splitlines()), (path.name, head)
  assert "Exit codes" in head


def test_shipped_configs_skips_files_without_a_docstring(tmp_path):
  (tmp_path / "a.py").write_text('"""First line.\n\nMore."""\n')
  (tmp_path / "b.py").write_text("x = 1\n")
  (tmp_path / "__init__.py").write_text("")
  assert cli.shipped_configs(str(tmp_path)).splitlines() == [
      "configs:", "  configs/a.py  First line.", "  configs/b.py"]
