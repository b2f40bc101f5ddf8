"""Run outputs: atomic files, the per-round metrics log, plots, TensorBoard, tables.

Why atomic: a run may be killed (SIGKILL, pre-emption) at any instant and resumed, so
every file in the workdir is either the old complete version or the new complete
version, never half-written. Metrics are appended line by line and fsynced, and a
torn last line (a kill mid-append) is ignored on read and dropped on resume.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
import os
import platform
import sys
import tempfile
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from absl import logging

MB = 1e6  # bytes per MB in plots and tables (decimal, as in the run header).
PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------
# Atomic files


def _fsync_dir(directory: str) -> None:
  """Makes a rename durable; best effort (not every platform/filesystem allows it)."""
  with contextlib.suppress(OSError):
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def _default_mode() -> int:
  """0o666 minus the umask: what a plain open() would create (mkstemp makes 0o600)."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to a temp file in the same directory, fsyncs it, then os.replace()s
  it onto `path`: readers see the old file or the new one, never a partial one."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, _default_mode())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  _fsync_dir(directory)


def atomic_write_text(path: PathLike, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
  """NumPy/JAX scalars and arrays -> Python numbers and lists (json's `default` hook)."""
  if hasattr(obj, "tolist"):  # np.ndarray, np.generic, jax.Array
    return obj.tolist()
  if isinstance(obj, (set, frozenset, tuple)):
    return list(obj)
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict
    return obj.to_dict()
  raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps(obj: Any, indent: Optional[int] = None) -> str:
  return json.dumps(obj, indent=indent, default=to_jsonable)


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> None:
  atomic_write_text(path, dumps(obj, indent=indent) + "\n")


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
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
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
  from matplotlib.ticker import FuncFormatter, NullFormatter
  ax.set_xscale("log")
  plain = FuncFormatter(lambda v, _: f"{v:g}")
  ax.xaxis.set_major_formatter(plain)
  narrow = max(xs) / min(xs) < 10
  ax.xaxis.set_minor_formatter(plain if narrow else NullFormatter())
  ax.tick_params(axis="x", which="minor", labelsize=7)


def _accuracy_axis(ax) -> None:
  from matplotlib.ticker import PercentFormatter
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


def _summary_writer_class() -> Any:
  """tensorboardX.SummaryWriter, imported without PyTorch.

  Why: tensorboardX imports torch at module level when it is installed (optional, only
  for torch tensors), which costs seconds per run; we log Python floats only.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # makes `import torch` raise ImportError, which it handles
  try:
    from tensorboardX import SummaryWriter
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


class TensorBoardLogger:
  """Scalars per round into TensorBoard event files (tensorboardX).

  A no-op (with one warning) when tensorboardX is missing; `close()` is idempotent.
  `purge_step`: on resume at round R pass R + 1 so TensorBoard hides the events of
  rounds that are being replayed.
  """

  def __init__(self, logdir: PathLike, purge_step: Optional[int] = None):
    self.logdir = os.fspath(logdir)
    self._writer = None
    try:
      SummaryWriter = _summary_writer_class()
    except ImportError:
      logging.warning("tensorboardX is not installed; no TensorBoard events are written")
      return
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
  from importlib import metadata
  out: dict[str, Optional[str]] = {"python": platform.python_version()}
  for name in _PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      module = sys.modules.get(name.replace("-", "_"))
      out[name] = getattr(module, "__version__", None)
  return out
