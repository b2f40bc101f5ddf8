"""Named public checkpoints, their verified download cache, and `load_pretrained`, which takes a
registry name, URL or local path to the params of a model (reading in `checkpoint_files`,
layout conversion in `checkpoint_layout`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import ipaddress
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import jax
from tqdm.auto import tqdm

from fedpeft_jax.files import PathLike, atomic_open, atomic_write_text
from fedpeft_jax.models.checkpoint_files import CheckpointError, read_checkpoint, snapshot_file
from fedpeft_jax.models.checkpoint_layout import convert_checkpoint, fit_checkpoint

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """A named public checkpoint.

  `model_kwargs` are the `ViT(...)` arguments the backbone was trained with (add your own
  `num_classes`); `head_classes` is the width of the checkpoint's own head. `sha256`/`size`,
  when known, are checked on every download and cache hit; when unknown, the digest of the first
  download is recorded next to the file and later cache hits are checked against it.
  """
  name: str
  url: str
  model_kwargs: Mapping[str, Any]
  head_classes: Optional[int] = None
  sha256: Optional[str] = None
  size: Optional[int] = None
  description: str = ""


_GCS = "https://storage.googleapis.com/vit_models"
REGISTRY: dict[str, CheckpointInfo] = {}


def register_checkpoint(info: CheckpointInfo, overwrite: bool = False) -> CheckpointInfo:
  """Add a named checkpoint (e.g. a mirror, or a file:// URL on an offline cluster)."""
  if info.name in REGISTRY and not overwrite:
    raise ValueError(f"checkpoint name {info.name!r} is already registered "
                     "(pass overwrite=True to replace it)")
  REGISTRY[info.name] = info
  return info


def list_checkpoints() -> list[str]:
  """The registered names, sorted (what `load_pretrained` takes besides paths and URLs)."""
  return sorted(REGISTRY)


for _info in (
    CheckpointInfo(
        "vit_b16_in21k", f"{_GCS}/imagenet21k/ViT-B_16.npz",
        {"variant": "B/16", "image_size": 224, "representation_size": 768}, head_classes=21843,
        description="Original ViT-B/16 ImageNet-21k release (Dosovitskiy et al. 2021); pre-Linen "
                    "names, pre_logits 768, zeroed 21843-way head. The FedPEFT backbone."),
    CheckpointInfo(
        "vit_b16_augreg_in21k",
        f"{_GCS}/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
        {"variant": "B/16", "image_size": 224}, head_classes=21843,
        description="AugReg ViT-B/16 ImageNet-21k (Steiner et al. 2022), ~391 MiB."),
    CheckpointInfo(
        "vit_s16_augreg_in21k",
        f"{_GCS}/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
        {"variant": "S/16", "image_size": 224}, head_classes=21843,
        description="AugReg ViT-S/16 ImageNet-21k, ~115 MiB."),
    CheckpointInfo(
        "vit_ti16_augreg_in21k",
        f"{_GCS}/augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
        {"variant": "Ti/16", "image_size": 224}, head_classes=21843,
        description="AugReg ViT-Ti/16 ImageNet-21k, ~37 MiB."),
):
  register_checkpoint(_info)


def default_cache_dir() -> Path:
  """$FEDPEFT_JAX_CACHE, else ~/.cache/fedpeft_jax/checkpoints."""
  env = os.environ.get("FEDPEFT_JAX_CACHE")
  return Path(env) if env else Path.home() / ".cache" / "fedpeft_jax" / "checkpoints"


def _check_url(url: str) -> urllib.parse.ParseResult:
  """HTTPS or file:// only; plain http only to a loopback host (local mirrors and tests)."""
  parts = urllib.parse.urlparse(url)
  if parts.scheme in ("https", "file"):
    return parts
  if parts.scheme == "http":
    host = parts.hostname or ""
    try:
      loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
      loopback = False
    if loopback:
      return parts
    raise CheckpointError(f"refusing to download {url!r} over plain http: use https "
                          "(http is accepted only from a loopback host)")
  raise CheckpointError(f"unsupported URL scheme {parts.scheme!r} in {url!r}; "
                        "use https:// or file://")


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def _verify(path: Path, sha256: Optional[str], size: Optional[int], what: str) -> str:
  """Size then sha256 check of `path`; returns its digest."""
  actual_size = path.stat().st_size
  if size is not None and actual_size != size:
    raise CheckpointError(f"{what}: size {actual_size} bytes, expected {size}")
  digest = _sha256_file(path)
  if sha256 is not None and digest.lower() != sha256.lower():
    raise CheckpointError(f"{what}: sha256 {digest}, expected {sha256}")
  return digest


# What a failed fetch raises: URLError (refused, DNS, file:// missing) and HTTPError are
# OSErrors, as are timeouts and resets; a body cut short is an http.client.HTTPException.
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


def _unreachable(url: str, error: BaseException, timeout: float) -> CheckpointError:
  """One line: which URL failed, why, and what to do about it."""
  if isinstance(error, urllib.error.HTTPError):
    why = f"HTTP {error.code} {error.reason}"
  elif isinstance(error, TimeoutError) or (isinstance(error, urllib.error.URLError)
                                           and isinstance(error.reason, TimeoutError)):
    why = f"no answer within {timeout:g} s"
  elif isinstance(error, urllib.error.URLError):
    why = str(error.reason)
  else:
    why = f"{type(error).__name__}: {error}"
  why = " ".join(why.split())
  return CheckpointError(f"could not download {url} ({why}); check the URL and the network, or "
                         "download the file yourself and pass its local path instead")


def _open_url(url: str, timeout: float) -> Any:
  try:
    return urllib.request.urlopen(url, timeout=timeout)
  except _NETWORK_ERRORS as e:
    raise _unreachable(url, e, timeout) from e


def _blocks(response: Any, url: str, timeout: float, size: int = 1 << 20) -> Iterator[bytes]:
  """The response body in blocks; a connection lost mid-body is a CheckpointError."""
  while True:
    try:
      block = response.read(size)
    except _NETWORK_ERRORS as e:
      raise _unreachable(url, e, timeout) from e
    if not block:
      return
    yield block


def download(url: str, cache_dir: Optional[PathLike] = None, *, sha256: Optional[str] = None,
             size: Optional[int] = None, progress: bool = True, timeout: float = 60.0) -> Path:
  """Fetch `url` once into `cache_dir` and return the local path.

  Why this shape: a partially written file must never be mistaken for a checkpoint, so the
  bytes go to a temp file in the same directory, are verified (size, sha256), and only then
  renamed into place (`fedpeft_jax.files.atomic_open`); a failure at any point (no connection,
  a connection lost mid-body, a wrong checksum) leaves nothing in the cache. The digest is kept
  in `<file>.sha256` so a later cache hit is re-verified even when the caller knows no digest
  (trust on first use).

  Raises:
    CheckpointError: a refused URL, a failed or truncated download, a wrong size or sha256, or
      a cache directory that cannot be written (one line each, saying what to do).
  """
  parts = _check_url(url)
  cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
  base = os.path.basename(urllib.parse.unquote(parts.path)) or "checkpoint"
  dest = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"
  digest_file = dest.with_name(dest.name + ".sha256")

  if dest.exists():
    known = sha256 or (digest_file.read_text().strip() if digest_file.exists() else None)
    try:
      _verify(dest, known, size, f"cached {dest}")
      return dest
    except CheckpointError as e:
      log.warning("%s; downloading again", e)
      dest.unlink()

  h = hashlib.sha256()
  try:
    with _open_url(url, timeout) as response, atomic_open(dest) as out:
      length = response.headers.get("Content-Length")
      total = int(length) if length and length.isdigit() else None
      with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=base,
                disable=not progress) as bar:
        for block in _blocks(response, url, timeout):
          out.write(block)
          h.update(block)
          bar.update(len(block))
      got = out.tell()
      if total is not None and got != total:
        raise CheckpointError(f"download of {url} truncated: {got} of {total} bytes")
      if size is not None and got != size:
        raise CheckpointError(f"download of {url}: size {got} bytes, expected {size}")
      if sha256 is not None and h.hexdigest().lower() != sha256.lower():
        raise CheckpointError(f"download of {url}: sha256 {h.hexdigest()}, expected {sha256}")
    atomic_write_text(digest_file, h.hexdigest() + "\n")
  except OSError as e:  # network errors are CheckpointErrors by now: this is the local disk
    raise CheckpointError(f"cannot write the download of {url} into {cache} "
                          f"({' '.join(str(e).split())}); free space, or choose a writable cache "
                          "directory (config.model.cache_dir or $FEDPEFT_JAX_CACHE)") from e
  return dest


def resolve_source(source: PathLike, cache_dir: Optional[PathLike] = None, *,
                   sha256: Optional[str] = None, progress: bool = True) -> Path:
  """A registry name, a URL (downloaded and cached) or a local path -> an existing file."""
  if isinstance(source, str) and source in REGISTRY:
    info = REGISTRY[source]
    return download(info.url, cache_dir, sha256=sha256 or info.sha256, size=info.size,
                    progress=progress)
  if isinstance(source, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source):
    return download(source, cache_dir, sha256=sha256, progress=progress)
  path = Path(source)
  if path.is_dir():  # a Hugging Face snapshot directory
    path = snapshot_file(path)
  if not path.is_file():
    hint = f"; registered names: {', '.join(list_checkpoints())}" if isinstance(source, str) else ""
    raise FileNotFoundError(f"checkpoint {str(source)!r} not found (not a file, URL or "
                            f"registered name){hint}")
  if sha256 is not None:
    _verify(path, sha256, None, f"checkpoint {path}")
  return path


def load_pretrained(source: PathLike, model: Any, keep_head: bool = False,
                    cache_dir: Optional[PathLike] = None, *, rng: Optional[jax.Array] = None,
                    sha256: Optional[str] = None, progress: bool = True) -> dict:
  """Pre-trained weights for `model` (our `ViT`), as a nested dict of float32 numpy arrays.

  Args:
    source: a registry name (`list_checkpoints()`), an https:// or file:// URL (downloaded once
      into `cache_dir`), or a local file (.npz, .safetensors, .pth/.bin) or HF snapshot dir.
    model: the ViT the weights must fit; its structure (`jax.eval_shape` of `model.init`) is
      the target, leaf for leaf.
    keep_head: load the checkpoint's head (an error unless it has `num_classes` outputs);
      by default the head is a fresh zero-initialised one.
    cache_dir: download cache (default `default_cache_dir()`).
    rng: initialiser key for PEFT parameters (LoRA, adapters, prompts, SSF) that no checkpoint
      has; default `jax.random.PRNGKey(0)`.
    sha256: expected digest of the file (checked before use).

  Raises:
    FileNotFoundError: no such file / registered name.
    CheckpointError: a download that fails, unknown format or layout, refused content, or
      missing / unexpected / mismatched keys (named, with both shapes).
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng
  path = resolve_source(source, cache_dir, sha256=sha256, progress=progress)
  raw = read_checkpoint(path)
  ckpt, layout = convert_checkpoint(raw, num_heads=model.arch()["num_heads"])
  log.info("loading %s (%s layout, %d tensors)", path, layout, len(ckpt))
  return fit_checkpoint(ckpt, model, keep_head, rng, str(path))
