"""Command line: `python -m fedpeft_jax.main --config=configs/X.py[:arg] --workdir=DIR`.

Any config field can be overridden (`--config.peft.method=lora`); the config is locked,
so a misspelled field is an error. Re-running with the same workdir resumes.

Bad input is not a bug: a flag that does not parse, a config field that does not exist, a
config file that cannot be loaded, an invalid config, and the run's own input errors (dataset
not prepared, checkpoint missing or unfit, privacy budget) end the program with exit code 2
and a message on stderr instead of a traceback.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Any, NoReturn, Optional, Sequence

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from fedpeft_jax.data import DatasetNotPreparedError
from fedpeft_jax.models import CheckpointError
from fedpeft_jax.privacy import PrivacyBudgetError
from fedpeft_jax.config_files import load_config_file
from fedpeft_jax.runner.train import run
from fedpeft_jax.runner.validate import ConfigError

BAD_INPUT = 2  # exit code for input errors (absl's own usage errors exit 1)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs and checkpoints.")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "Disable the progress bar.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() "
                                 "first (several hosts; auto-detected on TPU pods and SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def _fail(message: str) -> NoReturn:
  """One line on stderr, exit code 2."""
  print(" ".join(message.split()), file=sys.stderr)
  sys.exit(BAD_INPUT)


def _describe(error: BaseException) -> str:
  return f"{type(error).__name__}: {error}"


def _config_spec(argv: Sequence[str]) -> Optional[str]:
  """The value of --config on the command line ('path[:arg]'), the last one if repeated."""
  spec = None
  for i, arg in enumerate(argv):
    m = re.fullmatch(r"--?config(?:=(.*))?", arg, re.DOTALL)
    if m:
      spec = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv)
                                                         else None)
  return spec


def _override_paths(argv: Sequence[str]) -> list[str]:
  """The field paths of the --config.<path>[=value] overrides ('federated.rounds')."""
  return [m.group(1) for arg in argv
          if (m := re.match(r"--?(?:no)?config\.([^=]+)", arg))]


def _unknown_field(config: ml_collections.ConfigDict, path: str) -> Optional[str]:
  """Why `config.<path>` names no field of `config` (None when it does, or when the path uses
  syntax this check does not read, such as an index)."""
  node: Any = config
  walked = "config"
  parts = path.split(".")
  for i, part in enumerate(parts):
    if not re.fullmatch(r"\w+", part):
      return None
    if isinstance(node, ml_collections.ConfigDict):
      if part not in node:
        close = difflib.get_close_matches(part, list(node.keys()), n=1)
        hint = (f"did you mean {walked}.{close[0]}?" if close
                else f"the fields of {walked} are {', '.join(sorted(node.keys()))}")
        what = "no such config field" if i == len(parts) - 1 else (
            f"{walked}.{part} is not a config field")
        return f"{what}; {hint}"
      node = node[part]
    elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
      node = node[int(part)]
    else:
      return f"{walked} holds a {type(node).__name__} value, not fields"
    walked += f".{part}"
  return None


def _command_line_error(error: Optional[BaseException], argv: Sequence[str]) -> str:
  """One line saying what is wrong with the command line.

  Why not absl's message: a misspelled field surfaces from ml_collections as a bare
  AttributeError or KeyError that does not say which override it came from, and an error in
  the config file as a wrapped traceback. So the config file is loaded again here (only on
  this error path) to tell which of: the file, an override's field, or anything else.
  """
  spec = _config_spec(argv)
  if spec:
    path, colon, arg = spec.partition(":")
    if not os.path.isfile(path):
      return (f"--config={spec}: no config file {path!r} (a relative path starts at the "
              f"working directory, {os.getcwd()})")
    try:
      config = load_config_file(path).get_config(*([arg] if colon else []))
    except Exception as e:  # anything the config file raises is the file's error
      return f"--config={spec}: the config file raised {_describe(e)}"
    if isinstance(config, ml_collections.ConfigDict):
      for field in _override_paths(argv):
        problem = _unknown_field(config, field)
        if problem:
          return f"--config.{field}: {problem}"
  if error is None:
    return f"--config={spec}: the config file's get_config() gave no ConfigDict"
  if isinstance(error, flags.Error):
    return str(error)
  return _describe(error)


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run`'s flags_parser: absl's parsing, with a bad command line reported as one line on
  stderr and exit code 2 (instead of absl's usage text, or a traceback for a misspelled
  config field)."""
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # any parse failure is the command line's (or its config file's)
    _fail(f"Invalid command line: {_command_line_error(e, argv)}")
  # config_flags defers a config file it cannot read to the config's first use.
  if not isinstance(_CONFIG.value, ml_collections.ConfigDict):
    _fail(f"Invalid command line: {_command_line_error(None, argv)}")
  return rest


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"Invalid command line: unexpected arguments {argv[1:]} (flags are --name=value)")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if _DISTRIBUTED.value or _COORDINATOR.value:
    # Importing jax (and this package) runs no computation; initialize() must only come
    # before the first one, which is inside `run`.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; else unused
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  try:
    run(_CONFIG.value, _WORKDIR.value, progress=not _NO_PROGRESS.value)
  except ConfigError as e:
    print(f"Invalid config: {e}", file=sys.stderr)
    sys.exit(BAD_INPUT)
  except (DatasetNotPreparedError, CheckpointError, PrivacyBudgetError, FileNotFoundError) as e:
    # Bad input, not a bug: one clear message, no traceback.
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(BAD_INPUT)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
