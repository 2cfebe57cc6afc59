"""The import graph of the library and the trainer: one direction, no cycles."""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("densenet_jax", "train")


def _module(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """module -> the project modules it imports anywhere (type-only and function-local too)."""
  modules = {_module(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        imported.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module:
        imported.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                        else node.module for a in node.names)
    # A module's own packages are imported before it in any case.
    graph[name] = {m for m in imported if m in modules and not (name + ".").startswith(m + ".")}
  return graph


def test_the_library_imports_nothing_from_the_trainer():
  assert {(m, i) for m, imports in import_graph().items() if m.startswith("densenet_jax")
          for i in imports if i.startswith("train")} == set()


def test_no_module_imports_itself_through_others():
  graph = import_graph()

  def cycle_from(start: str) -> list[str] | None:
    stack = [(start, [start])]
    seen = set()
    while stack:
      module, path = stack.pop()
      for nxt in graph[module]:
        if nxt == start:
          return path + [start]
        if nxt not in seen:
          seen.add(nxt)
          stack.append((nxt, path + [nxt]))
    return None

  cycles = [c for m in sorted(graph) if (c := cycle_from(m))]
  assert not cycles, cycles
