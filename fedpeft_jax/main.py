"""Command line: `python -m fedpeft_jax.main --config=configs/X.py[:arg] --workdir=DIR`.

Any config field can be overridden (`--config.peft.method=lora`); the config is locked,
so a misspelled field is an error. Re-running with the same workdir resumes.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs and checkpoints.")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "Disable the progress bar.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from fedpeft_jax.runner.train import run
  from fedpeft_jax.runner.validate import ConfigError
  try:
    run(_CONFIG.value, _WORKDIR.value, progress=not _NO_PROGRESS.value)
  except ConfigError as e:
    print(f"Invalid config: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
