"""The offline quickstart: pre-train on Fashion-MNIST, fine-tune federatedly on digits.

  python -m experiments.quickstart --workdir=runs/quickstart

Pre-training is cached in WORKDIR/pretrain; each method runs in WORKDIR/<method> (resumable,
a finished one is reused). Prints one table: final accuracy, trainable parameters, MB per
round, total MB and accuracy relative to full fine-tuning.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging

from fedpeft_jax.pretrain import pretrain
from fedpeft_jax.runner import outputs
from fedpeft_jax.config_files import repo_config
from fedpeft_jax.runner.train import run

_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Output directory.")
_METHODS = flags.DEFINE_list("methods", ["full", "head", "bias", "adapter", "prompt", "lora",
                                         "scratch"], "Methods to run ('scratch' = no pre-training).")
_ROUNDS = flags.DEFINE_integer("rounds", 0, "Override the number of rounds (0: the config's).")
_FASHION_DIR = flags.DEFINE_string("fashion_mnist_dir", "", "Folder of the four Fashion-MNIST IDX "
                                   "files ('' = the Debian package's /usr/share/datasets/"
                                   "fashion-mnist).")


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  t0 = time.time()
  workdir = _WORKDIR.value
  pretrain_config = repo_config("pretrain_fashion").get_config()
  pretrain_config.data.data_dir = _FASHION_DIR.value
  ckpt = pretrain(pretrain_config, os.path.join(workdir, "pretrain"))
  results = {}
  for method in _METHODS.value:
    config = repo_config("quickstart").get_config(method)
    if method != "scratch":
      config.model.pretrained = ckpt
    if _ROUNDS.value:
      config.federated.rounds = _ROUNDS.value
    print(f"\n=== {method} ===", flush=True)
    summary = run(config, os.path.join(workdir, method), progress=False)
    results[method] = (summary, outputs.MetricsLog(os.path.join(workdir, method,
                                                                "metrics.jsonl")).read())
  full_acc = results["full"][0]["final_accuracy"] if "full" in results else None
  rows = []
  for method, (s, _) in results.items():
    rows.append({
        "method": method,
        "final_acc": round(s["final_accuracy"], 4),
        "best_acc": round(s["best_accuracy"], 4),
        "trainable_params": s["trainable_params"],
        "MB_per_round": round(s["total_bytes"] / s["rounds"] / 1e6, 4),
        "total_MB": round(s["total_bytes"] / 1e6, 3),
        "acc_vs_full": (round(s["final_accuracy"] / full_acc, 3) if full_acc else None),
    })
  outputs.compare_plot({m: r for m, (_, r) in results.items()},
                       os.path.join(workdir, "accuracy_vs_communication.png"))
  outputs.atomic_write_json(os.path.join(workdir, "table.json"), rows)
  print("\nFederated fine-tuning on digits (10 clients, Dirichlet 0.5), ViT pre-trained on "
        "Fashion-MNIST:")
  print(outputs.format_table(rows, list(rows[0])))
  print(f"\nquickstart wall time: {time.time() - t0:.0f}s; outputs in {workdir}")


if __name__ == "__main__":
  app.run(main)
