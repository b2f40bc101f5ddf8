"""Reading checkpoint files: the raw {key: float array} of a .npz, .safetensors, PyTorch
.pth/.bin or Hugging Face snapshot directory, keys as stored.

The format is told from the file's bytes, not its name. Checkpoint files are untrusted input:
nothing is unpickled (`np.load(allow_pickle=False)`, the safetensors reader,
`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from fedpeft_jax.files import PathLike

# The file names a Hugging Face snapshot (`save_pretrained`, the Hub) keeps its weights in,
# in order of preference.
SNAPSHOT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model (the message says why)."""


def snapshot_file(directory: PathLike) -> Path:
  """The weights file of a Hugging Face snapshot directory."""
  directory = Path(directory)
  for name in SNAPSHOT_FILES:
    if (directory / name).is_file():
      return directory / name
  raise FileNotFoundError(f"checkpoint directory {str(directory)!r} holds no "
                          f"{' or '.join(SNAPSHOT_FILES)}")


def _sniff(path: Path) -> str:
  """'npz' | 'safetensors' | 'torch' from the first bytes; CheckpointError otherwise."""
  with open(path, "rb") as f:
    head = f.read(16)
  file_size = path.stat().st_size
  if head[:4] == b"PK\x03\x04":
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except zipfile.BadZipFile as e:
      raise CheckpointError(f"{path}: corrupt zip archive ({e})") from e
    if names and all(n.endswith(".npy") for n in names):
      return "npz"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
      return "torch"
    raise CheckpointError(f"{path}: a zip archive that is neither .npz nor a PyTorch checkpoint "
                          f"(members: {names[:5]})")
  if len(head) >= 9:
    n = int.from_bytes(head[:8], "little")
    if 2 <= n <= file_size - 8 and head[8:9] == b"{":
      return "safetensors"
  if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
    return "torch"  # legacy (non-zip) torch.save; still read with weights_only=True
  if head[:6] == b"\x93NUMPY":
    raise CheckpointError(f"{path}: a single .npy array, not a checkpoint (expected .npz, "
                          ".safetensors or a PyTorch state dict)")
  raise CheckpointError(f"{path}: unknown checkpoint format (first bytes {head[:8]!r}); expected "
                        ".npz (zip of .npy), .safetensors or a PyTorch .pth/.bin")


_ML_FLOATS = {"bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"}


def _as_float_array(key: str, value: Any, path: Path) -> np.ndarray:
  arr = np.asarray(value)
  if arr.dtype.kind == "V" and arr.dtype.name in _ML_FLOATS:  # bfloat16 etc. (ml_dtypes)
    arr = arr.astype(np.float32)
  if arr.dtype.kind not in "fiu":
    raise CheckpointError(f"{path}: tensor {key!r} has dtype {arr.dtype}, not a number "
                          "(a bfloat16 array saved by np.savez is stored as raw void 'V2' "
                          "and cannot be told apart; convert it to float32)")
  return arr


def _read_npz(path: Path) -> dict[str, np.ndarray]:
  out = {}
  with np.load(path, allow_pickle=False) as z:
    for key in z.files:
      try:
        arr = z[key]
      except ValueError as e:
        if "allow_pickle" in str(e):
          raise CheckpointError(f"{path}: array {key!r} is an object (pickled) array; refused "
                                "because checkpoints are read with allow_pickle=False") from e
        raise CheckpointError(f"{path}: array {key!r} cannot be read: {e}") from e
      out[key] = _as_float_array(key, arr, path)
  return out


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  out = {}
  try:
    with safe_open(str(path), framework="numpy") as f:
      keys = list(f.keys())
      pending = []
      for key in keys:
        try:
          out[key] = _as_float_array(key, f.get_tensor(key), path)
        except TypeError:  # bfloat16 has no numpy dtype name: read those through jax
          pending.append(key)
    if pending:
      with safe_open(str(path), framework="flax") as f:
        for key in pending:
          out[key] = np.asarray(jnp.asarray(f.get_tensor(key), jnp.float32))
  except CheckpointError:
    raise
  except Exception as e:  # the reader's own errors (bad header, truncated file)
    raise CheckpointError(f"{path}: invalid safetensors file: {e}") from e
  return out


def _read_torch(path: Path) -> dict[str, np.ndarray]:
  try:
    import torch  # lazy: heavy, and only PyTorch checkpoints need it (a test-only dependency)
  except ImportError as e:
    raise CheckpointError(f"{path} is a PyTorch checkpoint; reading it needs torch installed "
                          "(or convert it to .safetensors)") from e
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:
    raise CheckpointError(f"{path}: refused by torch.load(weights_only=True), which only "
                          f"accepts tensors and plain containers: {e}") from e
  for wrapper in ("state_dict", "model", "module", "model_state"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
      break
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict (mapping of tensors), got "
                          f"{type(obj).__name__}")
  out = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    t = value.detach().cpu()
    out[str(key)] = _as_float_array(key, (t.float() if t.is_floating_point() else t).numpy(), path)
  return out


def read_checkpoint(path: PathLike) -> dict[str, np.ndarray]:
  """The raw {key: array} of a checkpoint file (or Hugging Face snapshot directory), keys as
  stored."""
  path = Path(path)
  if path.is_dir():
    path = snapshot_file(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint file {str(path)!r} not found")
  fmt = _sniff(path)
  reader = {"npz": _read_npz, "safetensors": _read_safetensors, "torch": _read_torch}[fmt]
  raw = reader(path)
  if not raw:
    raise CheckpointError(f"{path}: the {fmt} file holds no tensors")
  return raw

