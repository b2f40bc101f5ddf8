"""The study's "client stability x data distribution" grid for any base config.

  python -m experiments.client_grid --config=configs/study.py:cifar100,bias --workdir=runs/grid
  python -m experiments.client_grid --config=configs/quickstart.py:bias --workdir=runs/qs_grid \
      --methods=full,bias,prompt --clients=16,64 --participation=1.0,0.125 --splits=dirichlet,iid \
      --config.model.pretrained=runs/quickstart/pretrain/pretrained.npz

Runs every (method, clients, participation, split) cell as its own resumable run in
WORKDIR/<cell>, then prints the final and best accuracy of each cell and the MB moved, as in the
study's table. Cells that finished earlier are reused.
"""

from __future__ import annotations

import copy
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from fedpeft_jax.runner import outputs
from fedpeft_jax.runner.train import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_METHODS = flags.DEFINE_list("methods", [], "PEFT methods ('' = the config's).")
_CLIENTS = flags.DEFINE_list("clients", ["16", "64"], "Numbers of clients.")
_PARTICIPATION = flags.DEFINE_list("participation", ["1.0", "0.125"], "Fractions per round.")
_SPLITS = flags.DEFINE_list("splits", ["dirichlet", "iid"], "Partitions.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  base = _CONFIG.value
  methods = _METHODS.value or [base.peft.method]
  t0 = time.time()
  rows = []
  for method in methods:
    for split in _SPLITS.value:
      for clients in (int(c) for c in _CLIENTS.value):
        for part in (float(p) for p in _PARTICIPATION.value):
          config = copy.deepcopy(base)
          config.peft.method = method
          config.data.partition = split
          config.federated.num_clients = clients
          config.federated.clients_per_round = 0
          config.federated.participation = part
          name = f"{method}_{split}_{clients}c_{part:g}p"
          print(f"=== {name} ===", flush=True)
          s = run(config, os.path.join(_WORKDIR.value, name), progress=False)
          rows.append({"method": method, "split": split, "clients": clients,
                       "participation": part, "final_acc": round(s["final_accuracy"], 4),
                       "best_acc": round(s["best_accuracy"], 4),
                       "total_MB": round(s["total_bytes"] / 1e6, 3)})
  outputs.atomic_write_json(os.path.join(_WORKDIR.value, "grid.json"), rows)
  print(outputs.format_table(rows, list(rows[0])))
  print(f"grid wall time: {time.time() - t0:.0f}s")


if __name__ == "__main__":
  app.run(main)
