"""Atomic file writes shared by runs, pre-training and experiments.

Why atomic: a run may be killed (SIGKILL, pre-emption) at any instant and resumed, and a
download may fail half-way, so every file we write is either the old complete version or the
new complete version, never half-written. Everything goes to a temp file in the target's
directory, is fsynced, and is then renamed onto the target (`os.replace`, atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import IO, Any, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


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


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: Optional[int] = None) -> Iterator[IO[bytes]]:
  """A binary file to write `path` through: a temp file beside it that is fsynced and renamed
  onto `path` when the block ends normally, and deleted when the block raises.

  For writes that stream (downloads) or may be refused half-way (a checksum that does not
  match): raising inside the block leaves `path` as it was and no temp file behind. `mode`:
  the file's permission bits (default: what a plain open() makes under the umask; 0o600
  keeps a secret the owner's from the first byte, as mkstemp creates it so).
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, _default_mode() if mode is None else mode)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  _fsync_dir(directory)


def atomic_write_bytes(path: PathLike, data: bytes, mode: Optional[int] = None) -> None:
  """Writes `data` to `path`: readers see the old file or the new one, never a partial one."""
  with atomic_open(path, mode) as f:
    f.write(data)


def scrub(path: PathLike) -> None:
  """Overwrites a file's bytes with zeros (fsynced), then unlinks it; a directory: each of its
  files, then the tree. For secrets: an unlinked file's blocks keep their bytes until reused,
  so they are zeroed first (best effort: copy-on-write filesystems and SSD wear-levelling may
  still hold old copies)."""
  path = os.fspath(path)
  if os.path.isdir(path) and not os.path.islink(path):
    for root, _, files in os.walk(path):
      for name in files:
        scrub(os.path.join(root, name))
    shutil.rmtree(path)
    return
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.write(b"\0" * size)
    f.flush()
    os.fsync(f.fileno())
  os.unlink(path)
  _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_text(path: PathLike, text: str) -> None:
  """`atomic_write_bytes` of UTF-8 text."""
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
  """json.dumps that also takes NumPy/JAX values, paths and ConfigDicts (`to_jsonable`)."""
  return json.dumps(obj, indent=indent, default=to_jsonable)


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> None:
  """`obj` as indented JSON (`dumps`), written atomically."""
  atomic_write_text(path, dumps(obj, indent=indent) + "\n")
