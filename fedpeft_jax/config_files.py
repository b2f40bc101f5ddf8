"""Loading config files by path, the way `--config=configs/X.py` does.

Presets build on each other (`study.py` on `default.py`); loading siblings by path keeps
them working from any working directory, and gives tests and scripts one way in. It sits
below every layer (configs, the runner, experiments and tests all load through it), so a
config file never imports the runner.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType


def load_config_file(path: str) -> ModuleType:
  """The module of a config file (it exposes `get_config(arg)`)."""
  path = os.path.abspath(path)
  name = "fedpeft_configs_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file {path!r} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling(config_file: str, name: str) -> ModuleType:
  """`name`.py from the same folder as `config_file` (pass `__file__`)."""
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(config_file)),
                                       f"{name}.py"))


def repo_config(name: str) -> ModuleType:
  """configs/`name`.py of this checkout (for scripts and tests)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # fedpeft_jax/..
  return load_config_file(os.path.join(root, "configs", f"{name}.py"))
