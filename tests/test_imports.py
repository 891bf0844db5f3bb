"""The project's import graph: no cycle, and no project import hidden inside a function (such
imports are how cycles stay alive unnoticed). Read from the sources with `ast`; nothing runs."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("keel_jax", "experiments", "configs")


def modules() -> dict[str, str]:
  """Dotted module name → file, for every .py file of the project's packages."""
  out = {}
  for pkg in PACKAGES:
    for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
          out[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
  return out


def project_imports(tree: ast.AST, known: set[str]):
  """(imported module, line, at module level?) for each import of a project module."""
  top = {id(n) for n in tree.body}
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # `from pkg import mod` imports pkg.mod when that is a module, else a name of pkg.
      names = [f"{node.module}.{a.name}" for a in node.names]
      names = [n if n in known else node.module for n in names]
    for name in names:
      if name.split(".")[0] in PACKAGES:
        yield name, node.lineno, id(node) in top


def graph() -> tuple[dict[str, set[str]], list[str]]:
  mods = modules()
  edges, inside = {m: set() for m in mods}, []
  for mod, path in mods.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    for name, line, at_top in project_imports(tree, set(mods)):
      while name not in mods and "." in name:  # a name imported from a module
        name = name.rsplit(".", 1)[0]
      if name in mods and name != mod:
        edges[mod].add(name)
      if not at_top:
        inside.append(f"{path}:{line} imports {name}")
  return edges, inside


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(edges[m]):
      if state.get(n) == "open":
        return stack[stack.index(n) :] + [n]
      if n not in state and (cycle := visit(n)):
        return cycle
    stack.pop()
    state[m] = "done"
    return None

  for m in sorted(edges):
    if m not in state and (cycle := visit(m)):
      return cycle
  return None


def test_the_import_graph_has_no_cycle():
  edges, _ = graph()
  assert len(edges) > 40 and edges["keel_jax.train"] >= {"keel_jax.builders", "keel_jax.steps"}
  assert find_cycle(edges) is None, " → ".join(find_cycle(edges))


def test_no_project_import_inside_a_function():
  _, inside = graph()
  assert not inside, "\n".join(inside)


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
