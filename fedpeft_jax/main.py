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
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() "
                                 "first (several hosts; auto-detected on TPU pods and SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if _DISTRIBUTED.value or _COORDINATOR.value:
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; else unused
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from fedpeft_jax.data import DatasetNotPreparedError
  from fedpeft_jax.models.checkpoints import CheckpointError
  from fedpeft_jax.privacy import PrivacyBudgetError
  from fedpeft_jax.runner.train import run
  from fedpeft_jax.runner.validate import ConfigError
  try:
    run(_CONFIG.value, _WORKDIR.value, progress=not _NO_PROGRESS.value)
  except ConfigError as e:
    print(f"Invalid config: {e}", file=sys.stderr)
    sys.exit(2)
  except (DatasetNotPreparedError, CheckpointError, PrivacyBudgetError, FileNotFoundError) as e:
    # Bad input, not a bug: one clear message, no traceback.
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
