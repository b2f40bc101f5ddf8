"""What the experiment scripts share: running a plan of resumable runs, and their result files.

experiments/frontier.py and experiments/cpu_study.py each plan many runs of
`fedpeft_jax.runner.train.run` and must survive being interrupted and re-run. The mechanism
is the same for both and lives here once: a run is finished when its folder holds a
summary.json (it is skipped), an unfinished one runs, or resumes from its checkpoint, in a
worker process; one that raises is collected and reported at the end instead of stopping
the others; the wall seconds of each run are added to WORKDIR/wall_seconds.json
({run name: seconds}, summed across invocations) as soon as it finishes, except for runs
whose DP mechanism makes their time private (`time_is_hidden`). What a run is, how
it is named, ordered and configured stays in each script. So do their results, written
with the two helpers at the end (results.csv and results.md's tables), which tests read back.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import json
import multiprocessing
import os
import sys
import time
import traceback
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import ml_collections
from absl import logging

from fedpeft_jax.files import atomic_write_json, atomic_write_text
from fedpeft_jax.runner.train import run

LEDGER = "wall_seconds.json"


@dataclasses.dataclass(frozen=True)
class Job:
  """One resumable run: trains `config(*args)` in `run_dir`. The config is built in the
  worker, so `config` must be a module-level function (workers unpickle it by name) and a
  broken config fails only its own run."""
  name: str  # the key in wall_seconds.json and the label in progress lines
  run_dir: str
  config: Callable[..., ml_collections.ConfigDict]
  args: tuple[Any, ...] = ()


def read_summary(run_dir: str) -> Optional[dict]:
  """The run's summary.json, None while the run is unfinished (train.run writes it last)."""
  path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def time_is_hidden(summary: dict) -> bool:
  """Whether the run's privacy mechanism covers its run time (DP-FedAvg: time reveals who
  took part) and its summary therefore leaves it out: wall_seconds.json must then too."""
  return ("train_seconds" in summary.get("non_private", ())
          and "train_seconds" not in summary)


def setup_process(cache_dir: str) -> None:
  """Quiet logs (orbax logs every save, dp_accounting warns per RDP order) and a persistent
  compilation cache shared by the workers and by later invocations: runs of equal shapes
  (and every evaluation) compile once."""
  logging.set_verbosity(logging.ERROR)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def execute(job: Job) -> float:
  """Runs (or resumes) one job; returns its wall seconds. Module level: runs in workers."""
  config = job.config(*job.args)
  t0 = time.time()
  run(config, job.run_dir, progress=False)
  return time.time() - t0


class RunPool:
  """Runs jobs (in `workers` processes; 1: in this process), skipping finished ones, and
  keeps their wall seconds in WORKDIR/wall_seconds.json across invocations. `noun` names a
  run in the progress lines and the failure report ('run', 'cell')."""

  def __init__(self, workdir: str, workers: int, noun: str = "run"):
    self.workdir = workdir
    self.workers = workers
    self.noun = noun
    self.ledger_path = os.path.join(workdir, LEDGER)
    self.seconds: dict[str, float] = {}
    if os.path.exists(self.ledger_path):
      with open(self.ledger_path) as f:
        self.seconds = json.load(f)
    self.failed: dict[str, str] = {}  # name -> traceback
    self.runs_done = 0  # by this object, i.e. this invocation

  def _done(self, job: Job, seconds: Optional[float], error: Optional[str], k: int,
            total: int, t0: float) -> None:
    if error is not None:
      self.failed[job.name] = error
      print(f"[{k}/{total}] {job.name} FAILED:\n{error}", flush=True)
      return
    self.runs_done += 1
    s = read_summary(job.run_dir)
    if time_is_hidden(s):
      took = "time not recorded (private under its DP mechanism)"
    else:
      self.seconds[job.name] = self.seconds.get(job.name, 0.0) + seconds
      atomic_write_json(self.ledger_path, self.seconds)
      took = f"in {seconds:.1f}s"
    print(f"[{k}/{total}] {job.name}: final {s['final_accuracy']:.4f} {took} "
          f"({time.time() - t0:.0f}s elapsed)", flush=True)

  def run(self, jobs: Iterable[Job]) -> None:
    """Runs the unfinished jobs, started in the given order."""
    todo = [j for j in jobs if read_summary(j.run_dir) is None]
    if not todo:
      return
    print(f"{len(todo)} {self.noun}s to run ({self.workers} worker(s))", flush=True)
    t0 = time.time()
    cache = os.path.join(self.workdir, "jax_cache")
    if self.workers <= 1:
      setup_process(cache)
      for k, job in enumerate(todo, 1):
        try:
          seconds = execute(job)
        except Exception:  # one broken run must not stop the others; reported at the end
          self._done(job, None, traceback.format_exc(), k, len(todo), t0)
        else:
          self._done(job, seconds, None, k, len(todo), t0)
      return
    context = multiprocessing.get_context("spawn")  # fork after JAX started is unsafe
    with concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=context,
                                                initializer=setup_process,
                                                initargs=(cache,)) as pool:
      futures = {pool.submit(execute, job): job for job in todo}
      try:
        for k, future in enumerate(concurrent.futures.as_completed(futures), 1):
          job = futures[future]
          try:
            seconds = future.result()
          except Exception:
            self._done(job, None, traceback.format_exc(), k, len(todo), t0)
          else:
            self._done(job, seconds, None, k, len(todo), t0)
      except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise

  def exit_if_failed(self) -> None:
    """After the results are written: name the failed runs and exit 1, so a caller sees
    the invocation as incomplete; re-running retries exactly those."""
    if self.failed:
      print(f"{len(self.failed)} {self.noun}(s) failed: {', '.join(self.failed)}; re-run the "
            "same command to retry them.", file=sys.stderr)
      sys.exit(1)


def write_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: str) -> None:
  """results.csv: `columns` in order, a missing or None value as an empty cell, written
  atomically so an interrupted invocation never leaves half a file."""
  buf = io.StringIO()
  writer = csv.DictWriter(buf, columns, lineterminator="\n")
  writer.writeheader()
  for r in rows:
    writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})
  atomic_write_text(path, buf.getvalue())


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
  """A GitHub markdown table of already formatted cells, as both scripts' results.md use
  (tests parse it back, so one format)."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
