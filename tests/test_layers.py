"""The import layering, read from the source with `ast`: data flows downhill (config ->
data + model -> round -> metrics), so no library module imports the runner, and config files
import neither the runner nor the experiments."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(path: str) -> set[str]:
  """Every module a file imports (absolute names, at any depth of the file)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def _files(folder: str) -> list[str]:
  out = []
  for base, _, names in os.walk(os.path.join(ROOT, folder)):
    out += [os.path.join(base, n) for n in names if n.endswith(".py")]
  return sorted(out)


def _bad(path: str, forbidden: tuple[str, ...]) -> list[str]:
  return sorted(m for m in _imports(path) if m.startswith(forbidden))


@pytest.mark.parametrize("path", [p for p in _files("fedpeft_jax")
                                  if os.sep + "runner" + os.sep not in p
                                  and not p.endswith(os.sep + "main.py")],
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_library_modules_never_import_the_runner(path):
  assert _bad(path, ("fedpeft_jax.runner", "experiments")) == []


@pytest.mark.parametrize("path", _files("configs"), ids=lambda p: os.path.relpath(p, ROOT))
def test_config_files_import_neither_runner_nor_experiments(path):
  assert _bad(path, ("fedpeft_jax.runner", "experiments")) == []


def test_the_check_catches_a_runner_import(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def f():\n  from fedpeft_jax.runner import train\n")
  assert _bad(str(bad), ("fedpeft_jax.runner",)) == ["fedpeft_jax.runner",
                                                      "fedpeft_jax.runner.train"]


@pytest.mark.parametrize("path", [os.path.join(ROOT, "fedpeft_jax", "pretrain.py")]
                         + _files(os.path.join("fedpeft_jax", "scoring")),
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_central_training_and_scoring_never_import_the_federated_engine(path):
  """Central pre-training takes its loss and evaluator from `fedpeft_jax.scoring`, which
  stands apart from the federated package (importing any of it runs the engine's import)."""
  assert _bad(path, ("fedpeft_jax.federated",)) == []
