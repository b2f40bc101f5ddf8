"""Run outputs: the per-round metrics log, plots, TensorBoard, tables, provenance.

Every file in the workdir is written atomically (`fedpeft_jax.files`), because a run may be
killed at any instant and resumed. Metrics are appended line by line and fsynced, and a
torn last line (a kill mid-append) is ignored on read and dropped on resume.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import platform
import sys
from importlib import metadata
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from absl import logging
# Agg through the object API, never pyplot: no global backend switch inside a host program.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter, PercentFormatter

from fedpeft_jax.files import (PathLike, atomic_write_bytes, atomic_write_json, atomic_write_text,
                               dumps)

# tensorboardX imports torch when it is installed (seconds per run), only to log torch tensors;
# we log Python floats, so torch is hidden while it loads (`import torch` then raises
# ImportError, which tensorboardX handles).
_HIDE_TORCH = "torch" not in sys.modules
if _HIDE_TORCH:
  sys.modules["torch"] = None  # type: ignore[assignment]
try:
  from tensorboardX import SummaryWriter
finally:
  if _HIDE_TORCH and sys.modules.get("torch", 0) is None:
    del sys.modules["torch"]

__all__ = [
    "MB", "MetricsLog", "write_plots", "compare_plot", "TensorBoardLogger", "format_table",
    "versions", "atomic_write_json",
]

MB = 1e6  # bytes per MB in plots and tables (decimal, as in the run header).


# ---------------------------------------------------------------------------
# Metrics log


class MetricsLog:
  """`metrics.jsonl`: one JSON object per round, appended, flushed and fsynced.

  Each row should hold an integer `round`. On resume from a checkpoint at round R,
  `truncate_after(R)` drops the rows of rounds the restored state has not seen yet,
  so replayed rounds are not logged twice.
  """

  def __init__(self, path: PathLike):
    self.path = os.fspath(path)

  def append(self, row: Mapping[str, Any]) -> None:
    line = dumps(dict(row))
    if "\n" in line:
      raise ValueError("a metrics row must serialise to one line")
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    with open(self.path, "a", encoding="utf-8") as f:
      if f.tell() > 0 and not self._ends_with_newline():
        f.write("\n")  # a previous append was torn; start a fresh line
      f.write(line + "\n")
      f.flush()
      os.fsync(f.fileno())

  def _ends_with_newline(self) -> bool:
    with open(self.path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      return f.read(1) == b"\n"

  def read(self) -> list[dict[str, Any]]:
    """All complete rows in order; unparsable lines (a torn append) are skipped."""
    if not os.path.exists(self.path):
      return []
    rows = []
    with open(self.path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        line = line.strip()
        if not line:
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          logging.warning("%s:%d is not valid JSON (a torn write?); skipped", self.path, number)
          continue
        if isinstance(row, dict):
          rows.append(row)
    return rows

  def truncate_after(self, round: int) -> None:
    """Atomically rewrites the log keeping only rows with row['round'] <= round."""
    if not os.path.exists(self.path):
      return
    kept = [r for r in self.read() if isinstance(r.get("round"), numbers.Number)
            and r["round"] <= round]
    atomic_write_text(self.path, "".join(dumps(r) + "\n" for r in kept))

  def last_round(self) -> int:
    """The largest logged round (0 if none)."""
    return max((int(r["round"]) for r in self.read()
                if isinstance(r.get("round"), numbers.Number)), default=0)


# ---------------------------------------------------------------------------
# Plots


def _figure(width: float = 6.4, height: float = 4.4):
  """A pyplot-free Agg figure: no global backend switch, safe inside any host program."""
  fig = Figure(figsize=(width, height), dpi=120)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path: PathLike) -> str:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", bbox_inches="tight")
  atomic_write_bytes(path, buf.getvalue())
  return os.fspath(path)


def _finite(x: Any) -> bool:
  return isinstance(x, numbers.Number) and not isinstance(x, bool) and math.isfinite(x)


def _curve(rows: Iterable[Mapping[str, Any]], x_key: str, scale: float = 1.0,
           positive: bool = False) -> tuple[list[float], list[float]]:
  """(x, accuracy) for rows that were evaluated; `positive` drops x <= 0 (log axes)."""
  xs, ys = [], []
  for r in rows:
    x, y = r.get(x_key), r.get("test_accuracy")
    if _finite(x) and _finite(y) and (not positive or x > 0):
      xs.append(x / scale)
      ys.append(y)
  return xs, ys


def _log_mb_axis(ax, xs: Sequence[float]) -> None:
  """Log x-axis with plain tick labels (0.4, 3, 300) instead of 4x10^-1; minor ticks
  are labelled only when the data spans less than a decade (else they crowd)."""
  ax.set_xscale("log")
  plain = FuncFormatter(lambda v, _: f"{v:g}")
  ax.xaxis.set_major_formatter(plain)
  narrow = max(xs) / min(xs) < 10
  ax.xaxis.set_minor_formatter(plain if narrow else NullFormatter())
  ax.tick_params(axis="x", which="minor", labelsize=7)


def _accuracy_axis(ax) -> None:
  ax.yaxis.set_major_formatter(PercentFormatter(1.0))
  ax.set_ylabel("test accuracy")
  ax.grid(True, which="both", alpha=0.3)


def write_plots(metrics_rows: Sequence[Mapping[str, Any]], out_dir: PathLike,
                title: str = "") -> list[str]:
  """accuracy_vs_round.png and accuracy_vs_communication.png (cumulative MB, log x) in
  `out_dir`; returns their paths. Rows without test_accuracy (no eval) are skipped."""
  out_dir = os.fspath(out_dir)
  paths = []
  fig = _figure()
  ax = fig.add_subplot()
  xs, ys = _curve(metrics_rows, "round")
  ax.plot(xs, ys, marker="o", markersize=3)
  ax.set_xlabel("round")
  _accuracy_axis(ax)
  if title:
    ax.set_title(title, fontsize=8)
  paths.append(_save(fig, os.path.join(out_dir, "accuracy_vs_round.png")))

  fig = _figure()
  ax = fig.add_subplot()
  xs, ys = _curve(metrics_rows, "cumulative_bytes", MB, positive=True)
  ax.plot(xs, ys, marker="o", markersize=3)
  if xs:
    _log_mb_axis(ax, xs)
  ax.set_xlabel("cumulative communication (MB, up + down, log scale)")
  _accuracy_axis(ax)
  if title:
    ax.set_title(title, fontsize=8)
  paths.append(_save(fig, os.path.join(out_dir, "accuracy_vs_communication.png")))
  return paths


def compare_plot(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: PathLike,
                 title: str = "Accuracy vs communication") -> str:
  """Several runs (name -> metrics rows) on one accuracy-vs-cumulative-MB figure (log x):
  the study's trade-off plot. The last point of each run is labelled with its accuracy."""
  fig = _figure(7.2, 4.8)
  ax = fig.add_subplot()
  all_xs: list[float] = []
  for name, rows in runs.items():
    xs, ys = _curve(rows, "cumulative_bytes", MB, positive=True)
    if not xs:
      continue
    all_xs += xs
    (line,) = ax.plot(xs, ys, marker="o", markersize=2.5, label=name)
    ax.annotate(f"{ys[-1]:.1%}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 0),
                fontsize=7, color=line.get_color(), va="center")
  if all_xs:
    _log_mb_axis(ax, all_xs)
    ax.legend(fontsize=8, loc="best")
  ax.set_xlabel("cumulative communication (MB, up + down, log scale)")
  _accuracy_axis(ax)
  ax.set_title(title, fontsize=9)
  return _save(fig, path)


# ---------------------------------------------------------------------------
# TensorBoard


class TensorBoardLogger:
  """Scalars per round into TensorBoard event files (tensorboardX).

  `close()` is idempotent. `purge_step`: on resume at round R pass R + 1 so TensorBoard hides the events of
  rounds that are being replayed.
  """

  def __init__(self, logdir: PathLike, purge_step: Optional[int] = None):
    self.logdir = os.fspath(logdir)
    os.makedirs(self.logdir, exist_ok=True)
    self._writer = SummaryWriter(self.logdir, purge_step=purge_step)

  def log(self, row: Mapping[str, Any], step: int) -> None:
    """Every finite numeric value of `row` (except `round`) as a scalar at `step`."""
    if self._writer is None:
      return
    for key, value in row.items():
      if key != "round" and _finite(value):
        self._writer.add_scalar(key, float(value), global_step=int(step))
    self._writer.flush()

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      writer, self._writer = self._writer, None
      writer.close()

  def __enter__(self) -> "TensorBoardLogger":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


# ---------------------------------------------------------------------------
# Terminal tables

Column = Union[str, tuple[str, str], tuple[str, str, Union[str, Callable[[Any], str]]]]


def _cell(value: Any, fmt: Union[str, Callable[[Any], str], None]) -> str:
  if value is None:
    return "-"
  if callable(fmt):
    return fmt(value)
  if fmt:
    return format(value, fmt)
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, numbers.Integral):
    return f"{value:,}"
  if isinstance(value, numbers.Real):
    if not math.isfinite(value):
      return str(value)
    return f"{value:,.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
  return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
  """A plain-text table. A column is a key, (key, header) or (key, header, fmt) where fmt
  is a format spec ('.2%') or a callable. Missing values print '-'; numbers align right."""
  specs = []
  for col in columns:
    if isinstance(col, str):
      specs.append((col, col, None))
    else:
      key, header, *rest = col
      specs.append((key, header, rest[0] if rest else None))
  cells = [[_cell(r.get(key), fmt) for key, _, fmt in specs] for r in rows]
  numeric = [all(isinstance(r.get(key), numbers.Number) or r.get(key) is None for r in rows)
             for key, _, _ in specs]
  widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(specs)]

  def line(values: Sequence[str]) -> str:
    return "  ".join(v.rjust(w) if num else v.ljust(w)
                     for v, w, num in zip(values, widths, numeric)).rstrip()

  out = [line([h for _, h, _ in specs]), "  ".join("-" * w for w in widths)]
  out += [line(c) for c in cells]
  return "\n".join(out)


# ---------------------------------------------------------------------------
# Provenance

_PACKAGES = ("fedpeft_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
             "ml-collections")


def versions() -> dict[str, Optional[str]]:
  """Installed versions of the packages a result depends on (None if absent), + python."""
  out: dict[str, Optional[str]] = {"python": platform.python_version()}
  for name in _PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      module = sys.modules.get(name.replace("-", "_"))
      out[name] = getattr(module, "__version__", None)
  return out
