"""Bad command lines end in exit code 2 and exactly one line on stderr, never a traceback, and
leave no workdir: a misspelled config field, a value of the wrong type, a config file that is
missing or broken, an unknown flag, and a checkpoint URL that cannot be downloaded."""

from __future__ import annotations

import os
import socket
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the slow tier: the CLI in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fails(tmp_path: Path, *args: str, config: str = "configs/tiny.py:bias,rounds=1") -> str:
  """Runs the CLI expecting bad input; returns its one stderr line."""
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "fedpeft_jax.main", f"--config={config}",
         f"--workdir={workdir}", "--no_progress", *args]
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].strip(), proc.stderr
  assert not workdir.exists()
  return lines[0]


@pytest.mark.parametrize("override,named,suggested", [
    ("--config.federated.roundz=3", "config.federated.roundz", "config.federated.rounds"),
    ("--config.federatd.rounds=3", "config.federatd", "config.federated"),  # a section
    ("--config.peft.lora.rnk=4", "config.peft.lora.rnk", "config.peft.lora.rank"),
])
def test_misspelled_field_names_it_and_the_fix(tmp_path, override, named, suggested):
  line = _fails(tmp_path, override)
  assert named in line and f"did you mean {suggested}?" in line, line


def test_field_with_no_close_match_lists_the_fields(tmp_path):
  line = _fails(tmp_path, "--config.zzz=3")
  assert "config.zzz" in line
  for field in ("data", "federated", "model", "peft", "privacy", "seed"):
    assert field in line, line


def test_value_of_the_wrong_type(tmp_path):
  line = _fails(tmp_path, "--config.federated.rounds=abc")
  assert "config.federated.rounds" in line and "abc" in line, line


def test_missing_config_file(tmp_path):
  line = _fails(tmp_path, config="configs/no_such_config.py")
  assert "configs/no_such_config.py" in line, line
  # With overrides too (config_flags then fails while applying them).
  line = _fails(tmp_path, "--config.federated.rounds=3", config="configs/no_such_config.py")
  assert "configs/no_such_config.py" in line, line


def test_broken_config_files(tmp_path):
  syntax = tmp_path / "syntax.py"
  syntax.write_text("def get_config(:\n  pass\n")
  line = _fails(tmp_path, config=str(syntax))
  assert "SyntaxError" in line and "syntax.py" in line, line

  raises = tmp_path / "raises.py"
  raises.write_text("def get_config(arg=''):\n  raise KeyError('no preset ' + repr(arg))\n")
  line = _fails(tmp_path, config=f"{raises}:abc")
  assert "KeyError" in line and "no preset 'abc'" in line, line

  # The config's own argument parser refuses an unknown key (a ValueError, which absl would
  # wrap together with the file's traceback).
  line = _fails(tmp_path, config="configs/tiny.py:rounds=2,zzz=1")
  assert "zzz" in line and "configs/tiny.py" in line, line


def test_unknown_flag_and_stray_argument(tmp_path):
  assert "bogus" in _fails(tmp_path, "--bogus")
  assert "stray" in _fails(tmp_path, "stray")


def test_unreachable_checkpoint_url(tmp_path):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}/missing.npz"
  cache = tmp_path / "cache"
  line = _fails(tmp_path, f"--config.model.pretrained={url}", f"--config.model.cache_dir={cache}")
  assert "config.model.pretrained" in line and url in line, line
  assert "local path" in line, line  # the way out: download it yourself, pass the file
  assert not cache.exists() or not any(cache.iterdir())  # nothing half-written


def test_attention_that_does_not_apply_names_the_field_and_why(tmp_path):
  # cuDNN attention asked for on the CPU in float32: one line naming the field, both reasons
  # and the fix; an unknown implementation is refused by the validator.
  line = _fails(tmp_path, "--config.model.attention=cudnn")
  assert "config.model.attention='cudnn'" in line and "not a GPU" in line, line
  assert "float32 is not half precision" in line and "set it to 'auto'" in line, line
  line = _fails(tmp_path, "--config.model.attention=flash")
  assert "config.model.attention" in line and "flash" in line, line


def test_infeasible_dirichlet_partition_names_the_fields_and_what_fits(tmp_path):
  # A new user's first try: the default config (64 clients, alpha 0.1, at least 10 examples
  # each) on digits' 1,437 training images.
  line = _fails(tmp_path, "--config.data.dataset=digits", config="configs/default.py")
  for field in ("config.data.alpha=0.1", "config.data.min_size=10",
                "config.federated.num_clients=64"):
    assert field in line, line
  assert line.endswith("use fewer clients or a larger alpha"), line
  # Where some smaller min_size fits the seed's draw, the message names it.
  line = _fails(tmp_path, "--config.data.dataset=digits", "--config.data.alpha=0.5",
                "--config.data.min_size=20", config="configs/default.py")
  fits = re.search(r"set config.data.min_size <= (\d+) \(fits this seed\)", line)
  assert fits and int(fits.group(1)) < 20, line


def test_a_workdir_of_another_config_is_one_line(tmp_path):
  workdir = tmp_path / "run"
  base = [sys.executable, "-m", "fedpeft_jax.main", "--config=configs/tiny.py:bias,rounds=1",
          f"--workdir={workdir}", "--no_progress"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  assert subprocess.run(base, cwd=ROOT, env=env, capture_output=True, timeout=300).returncode == 0
  proc = subprocess.run(base + ["--config.seed=1"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  (line,) = proc.stderr.splitlines()
  assert f"--workdir {workdir} holds a run of a different config" in line, line
