"""The docs cannot drift: every fenced code block of README.md and docs/*.md is exercised.

- ```python blocks run, in order, in one namespace per file, in a temporary working directory
  (so they may build on each other, and write nothing into the repository).
- ```python no-run blocks (they need the network, a checkpoint or finished runs) are compiled,
  and every module and name they import is imported.
- ```bash / ```sh blocks: every command is checked without being run.
  `python -m MODULE ARGS`: MODULE imports (in a child process, one per test session) and every
  `--flag` is one MODULE defines (absl, its `_define_flags()` included, or argparse); a
  `--config=FILE[:ARG]` loads, gets its `--config.a.b=v` overrides (the field must exist and
  take the value) and passes `validate_config`; a sweep's `--grid=field=...` points too.
  `python -m pytest ...` must be one of `.ci/run`'s commands; `pip install` names files and
  extras that exist; `apt-get install` the packages `.ci/run` installs. Any other command, or a
  block in another language, fails the test, so nothing in the docs goes unchecked.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest

from experiments.sweep import coerce_override

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LANGUAGES = {"python": {"", "no-run"}, "bash": {""}, "sh": {""}}
_FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)\s*(.*?)\s*$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclasses.dataclass(frozen=True)
class Block:
  path: Path
  line: int  # 1-based line of the opening fence
  lang: str
  info: str
  code: str

  @property
  def where(self) -> str:
    return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> Iterator[Block]:
  """The fenced code blocks of a Markdown file (indented fences too, e.g. in a list item)."""
  lines = path.read_text().splitlines()
  i = 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    indent, fence, lang, info = m.groups()
    end = re.compile(rf"^\s*{fence}`*\s*$")
    body, j = [], i + 1
    while j < len(lines) and not end.match(lines[j]):
      body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
      j += 1
    if j == len(lines):
      raise AssertionError(f"{path.relative_to(REPO)}:{i + 1}: unclosed code block")
    yield Block(path, i + 1, lang, info, "\n".join(body) + "\n")
    i = j + 1


def _all_blocks() -> list[Block]:
  return [b for p in DOC_FILES for b in blocks(p)]


def _ids(paths: list[Path]) -> list[str]:
  return [str(p.relative_to(REPO)) for p in paths]


def test_docs_exist_and_every_block_is_checked():
  names = {p.name for p in DOC_FILES}
  assert "README.md" in names and len(DOC_FILES) > 1
  found = _all_blocks()
  assert found
  for b in found:
    assert b.lang in LANGUAGES and b.info in LANGUAGES[b.lang], (
        f"{b.where}: a ```{b.lang} {b.info} block is not checked by tests/test_docs.py; use "
        f"```python, ```python no-run or ```bash")


def _slug(heading: str) -> str:
  """GitHub's anchor of a heading."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(path: Path) -> list[str]:
  """The lines of a Markdown file outside its code blocks."""
  lines = path.read_text().splitlines()
  for b in blocks(path):
    end = b.line + len(b.code.splitlines())  # the closing fence's 0-based index
    for i in range(b.line - 1, end + 1):
      lines[i] = ""
  return lines


def _anchors(path: Path) -> set[str]:
  return {_slug(l.lstrip("#")) for l in _prose(path) if re.match(r"#{1,6} ", l)}


def test_links_resolve_and_every_doc_is_listed():
  """Relative links (and their #anchors) in README.md and docs/ point at what exists; every
  docs/*.md is in README's table of contents and starts with its title and what a reader
  comes there for."""
  for path in DOC_FILES:
    for line in _prose(path):
      for target in re.findall(r"\]\(([^)\s]+)\)", line):
        if re.match(r"[a-z]+:", target):
          continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), f"{path.relative_to(REPO)}: broken link {target}"
        if anchor and resolved.suffix == ".md":
          assert anchor in _anchors(resolved), f"{path.relative_to(REPO)}: no #{anchor} in {file}"
  readme = (REPO / "README.md").read_text()
  for path in DOC_FILES[1:]:
    name = str(path.relative_to(REPO))
    assert f"]({name})" in readme, f"README.md does not list {name}"
    head = path.read_text().splitlines()
    assert head[0].startswith("# ") and not head[1] and head[2], f"{name}: title, then its purpose"


# ----------------------------------------------------------------------------- python blocks


def _check_imports(block: Block) -> None:
  """Every module and name a no-run block imports exists."""
  tree = ast.parse(block.code, block.where)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        importlib.import_module(alias.name)
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f"{block.where}: relative import"
      module = importlib.import_module(node.module)
      for alias in node.names:
        if alias.name == "*":
          continue
        if not hasattr(module, alias.name):  # a submodule
          importlib.import_module(f"{node.module}.{alias.name}")


_PYTHON_FILES = [p for p in DOC_FILES if any(b.lang == "python" for b in blocks(p))]


@pytest.mark.parametrize("path", _PYTHON_FILES, ids=_ids(_PYTHON_FILES))
def test_python_blocks_run(path, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace: dict[str, Any] = {"__name__": "__docs__"}
  for b in blocks(path):
    if b.lang != "python":
      continue
    code = compile(b.code, b.where, "exec")  # a syntax error names the file and line
    if b.info == "no-run":
      _check_imports(b)
      continue
    try:
      exec(code, namespace)  # pylint: disable=exec-used
    except Exception as e:
      raise AssertionError(f"{b.where}: the block raised {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------------ shell blocks


def commands(code: str) -> list[list[str]]:
  """The commands of a shell block: continuation lines joined, comments dropped, split at
  `&&`, `||` and `;`; `[--optional]` brackets of a usage line removed."""
  out: list[list[str]] = []
  for line in code.replace("\\\n", " ").splitlines():
    current: list[str] = []
    for token in shlex.split(line, comments=True):
      if token in ("&&", "||", ";"):
        out.append(current)
        current = []
        continue
      if token.startswith("["):
        token = token[1:].removesuffix("]")
      current.append(token)
    if current:
      out.append(current)
  return [c for c in out if c]


def _strip_env(cmd: list[str]) -> list[str]:
  """The command without its leading `VAR=value` assignments."""
  while cmd and _ENV.match(cmd[0]):
    cmd = cmd[1:]
  return cmd


def _ci_commands() -> list[list[str]]:
  return [_strip_env(c) for c in commands((REPO / ".ci" / "run").read_text())]


_INVENTORY = r'''
import ast, importlib, json, sys
from absl import app, flags, logging  # their own flags are every command's: not counted
import fedpeft_jax  # noqa: F401
FLAGS = flags.FLAGS
base = set(FLAGS)
CLI = ("fedpeft_jax.main", "fedpeft_jax.pretrain", "fedpeft_jax.data.prepare")
out = {}
for name in sys.argv[1:]:
  for f in set(FLAGS) - base:
    delattr(FLAGS, f)
  for m in list(sys.modules):  # a fresh import, so its module-level flags are defined again
    if m == "experiments" or m.startswith("experiments.") or m in CLI:
      del sys.modules[m]
  try:
    mod = importlib.import_module(name)
    if hasattr(mod, "_define_flags"):  # what `if __name__ == "__main__"` does
      mod._define_flags()
  except BaseException as e:
    out[name] = {"error": f"{type(e).__name__}: {e}"}
    continue
  info = {f: {"bool": bool(FLAGS[f].boolean), "config": type(FLAGS[f]).__name__ == "_ConfigFlag"}
          for f in set(FLAGS) - base}
  argparse_options = []
  with open(mod.__file__) as fh:
    for node in ast.walk(ast.parse(fh.read())):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "add_argument"):
        argparse_options += [a.value for a in node.args if isinstance(a, ast.Constant)
                             and isinstance(a.value, str) and a.value.startswith("-")]
  out[name] = {"flags": info, "argparse": argparse_options}
print("INVENTORY" + json.dumps(out))
'''


def _module_commands() -> list[tuple[Block, list[str]]]:
  found = []
  for b in _all_blocks():
    if b.lang in ("bash", "sh"):
      for c in map(_strip_env, commands(b.code)):
        if len(c) >= 3 and c[0] == "python" and c[1] == "-m" and c[2] != "pytest":
          found.append((b, c))
  return found


@pytest.fixture(scope="module")
def inventory() -> dict[str, Any]:
  """{module: {"flags": {name: {"bool", "config"}}, "argparse": [...]} or {"error": ...}} for
  every module the docs run, from one child process (modules define clashing flag names)."""
  modules = sorted({c[2] for _, c in _module_commands()})
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", _INVENTORY, *modules], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("INVENTORY")][-1]
  return json.loads(line.removeprefix("INVENTORY"))


def _parse_value(field: str, current: Any, text: str) -> Any:
  """An override's text read for a field holding `current`: the sweep's reader for the
  plain types (`experiments.sweep.coerce_override`), Python literals otherwise."""
  if isinstance(current, (bool, int, float, str)):
    return coerce_override(field, current, text)
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _check_config(where: str, module: str, spec: str, overrides: list[tuple[str, str]],
                  grids: list[str]) -> None:
  """--config=FILE[:ARG] loads; its overrides name fields and take their values; the result
  (and every sweep point) passes validate_config."""
  import ml_collections
  from fedpeft_jax.config_files import load_config_file
  from fedpeft_jax.runner.validate import validate_config

  path, colon, arg = spec.partition(":")
  assert (REPO / path).is_file(), f"{where}: --config={spec}: no file {path}"
  try:
    config = load_config_file(str(REPO / path)).get_config(*([arg] if colon else []))
  except Exception as e:
    raise AssertionError(f"{where}: --config={spec}: {type(e).__name__}: {e}") from e
  assert isinstance(config, ml_collections.ConfigDict), f"{where}: --config={spec}"
  for field, text in overrides:
    node: Any = config
    parts = field.split(".")
    for part in parts[:-1]:
      assert isinstance(node, ml_collections.ConfigDict) and part in node, (
          f"{where}: --config.{field}: config has no section {part!r}")
      node = node[part]
    assert isinstance(node, ml_collections.ConfigDict) and parts[-1] in node, (
        f"{where}: --config.{field}: no such config field")
    try:
      setattr(node, parts[-1], _parse_value(field, node[parts[-1]], text))
    except Exception as e:
      raise AssertionError(f"{where}: --config.{field}={text}: {type(e).__name__}: {e}") from e
  if module == "fedpeft_jax.pretrain":  # a pre-training config: its own fields, no rounds
    assert "pretrain" in config, f"{where}: --config={spec} is no pre-training config"
    return
  try:
    validate_config(config)
    if grids:
      from experiments import sweep
      for point in sweep.parse_grid(config, grids):
        validate_config(sweep.configure(config, point))
  except Exception as e:
    raise AssertionError(f"{where}: --config={spec}: {type(e).__name__}: {e}") from e


def _check_module_command(block: Block, cmd: list[str], inventory: dict[str, Any]) -> None:
  where = f"{block.where}: {' '.join(cmd)}"
  module = cmd[2]
  entry = inventory[module]
  assert "error" not in entry, f"{where}: importing {module} failed: {entry['error']}"
  known, argparse_options = entry["flags"], set(entry["argparse"])
  spec, overrides, grids = None, [], []
  args = cmd[3:]
  i = 0
  while i < len(args):
    arg = args[i]
    i += 1
    assert arg.startswith("--"), f"{where}: positional argument {arg!r}"
    name, eq, value = arg[2:].partition("=")
    if argparse_options:
      assert f"--{name}" in argparse_options, f"{where}: {module} has no option --{name}"
      if not eq:  # argparse takes `--name value` too
        assert i < len(args) and not args[i].startswith("--"), f"{where}: --{name} needs a value"
        i += 1
      continue
    if re.match(r"(no)?config\.", name):
      assert spec is not None, f"{where}: --{name} before --config"
      overrides.append((name.split(".", 1)[1], value if eq else "true"))
      continue
    if name in known:
      flag = known[name]
      assert eq or flag["bool"], f"{where}: --{name} takes a value (--{name}=...)"
      if flag["config"]:
        spec = value
      if name == "grid":
        grids.append(value)
      continue
    assert name.startswith("no") and known.get(name[2:], {}).get("bool") and not eq, (
        f"{where}: {module} defines no flag --{name}")
  if spec is not None:
    _check_config(where, module, spec, overrides, grids)


def _check_pip(where: str, cmd: list[str]) -> None:
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  extras = project.get("optional-dependencies", {})
  args = cmd[2:]
  assert cmd[1] == "install" and args, f"{where}"
  i = 0
  while i < len(args):
    arg = args[i]
    i += 1
    if arg in ("-r", "-e"):
      target = args[i]
      i += 1
      assert (REPO / target).exists(), f"{where}: no {target}"
      if arg == "-e":
        assert (REPO / target / "pyproject.toml").is_file(), f"{where}: {target} is no project"
      continue
    if arg in ("--no-deps", "-q", "-U", "--upgrade"):
      continue
    m = re.fullmatch(r"(\.|[\w-]+)(?:\[([\w,-]+)\])?", arg)
    assert m and m.group(1) in (".", project["name"]), f"{where}: unchecked pip argument {arg!r}"
    for extra in (m.group(2) or "").split(","):
      assert not extra or extra in extras, f"{where}: pyproject.toml has no extra {extra!r}"


def _check_command(block: Block, cmd: list[str], inventory: dict[str, Any]) -> None:
  where = f"{block.where}: {' '.join(cmd)}"
  cmd = _strip_env(cmd)
  assert cmd, where
  if cmd[:3] == ["python", "-m", "pytest"]:
    assert cmd in _ci_commands(), f"{where}: not one of .ci/run's test commands"
  elif cmd[:2] == ["python", "-m"] and len(cmd) > 2:
    _check_module_command(block, cmd, inventory)
  elif cmd[0] == "pip" or cmd[:3] == ["python", "-m", "pip"]:
    _check_pip(where, cmd if cmd[0] == "pip" else cmd[2:])
  elif cmd[0] == "apt-get":
    if cmd[1:] == ["update"]:
      return
    assert cmd[1] == "install", where
    ci_packages = {t for c in _ci_commands() if c and c[0] == "apt-get" for t in c[2:]
                   if not t.startswith("-")}
    for package in (t for t in cmd[2:] if not t.startswith("-")):
      assert package in ci_packages, f"{where}: .ci/run does not install {package}"
  else:
    raise AssertionError(f"{where}: tests/test_docs.py has no check for this command")


_SHELL_FILES = [p for p in DOC_FILES if any(b.lang in ("bash", "sh") for b in blocks(p))]


@pytest.mark.parametrize("path", _SHELL_FILES, ids=_ids(_SHELL_FILES))
def test_shell_commands(path, inventory):
  checked = 0
  for b in blocks(path):
    if b.lang in ("bash", "sh"):
      cmds = commands(b.code)
      assert cmds, f"{b.where}: empty block"
      for cmd in cmds:
        _check_command(b, cmd, inventory)
        checked += 1
  assert checked


def test_the_checks_catch_drift(inventory):
  """The command checks fail on a drifted command (an unknown flag, config field or value)."""
  block = Block(REPO / "README.md", 0, "bash", "", "")
  good = ["python", "-m", "fedpeft_jax.main", "--config=configs/tiny.py:lora", "--workdir=w"]
  _check_command(block, good, inventory)
  for bad in (good + ["--no_such_flag=1"], good + ["--config.federated.roundz=3"],
              good + ["--config.federated.rounds=three"],
              good + ["--config.federated.clients_per_round=99"],
              ["python", "-m", "fedpeft_jax.main", "--config=configs/nope.py", "--workdir=w"],
              ["python", "-m", "pytest", "-q", "tests"], ["make", "all"]):
    with pytest.raises(AssertionError):
      _check_command(block, bad, inventory)
