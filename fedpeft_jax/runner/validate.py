"""Config validation before any compute: one clear error naming the offending field.

Why a separate pass: a misconfigured run should fail in a second, before data loading,
compilation or a half-written workdir, with a message that says which field is wrong
and what it may be. Nothing here runs JAX. The allowed values are imported from the
modules that implement them, so a new dtype, pool, optimizer or dataset is accepted here
as soon as it exists there, and never before.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Callable
from typing import Any

from fedpeft_jax.data import list_datasets, parse_classes, validation_count
from fedpeft_jax.data.datasets import check_augment
from fedpeft_jax.data.partitioning import check_method
from fedpeft_jax.federated.aggregation import check_weighting
from fedpeft_jax.federated.client import check_client_optimizer
from fedpeft_jax.federated.comm import check_wire_dtype
from fedpeft_jax.federated.compression import check_compression
from fedpeft_jax.federated.feature_cache import check_feature_cache
from fedpeft_jax.federated.lora_aggregation import (FOLDING_AGGREGATIONS, check_round,
                                                    check_rule, client_ranks)
from fedpeft_jax.federated.personal import check_schedule, parse_patterns
from fedpeft_jax.federated.sampling import check_client_sampling
from fedpeft_jax.federated.server import check_server_lr_schedule, check_server_optimizer
from fedpeft_jax.models import REGISTRY, VARIANTS, parse_variant
from fedpeft_jax.models.factory import check_model_dtype
from fedpeft_jax.models.vit import check_attention, check_pool
from fedpeft_jax.peft.config import default_config as default_peft_config
from fedpeft_jax.peft.config import parse_methods
from fedpeft_jax.peft.config import validate as validate_peft
from fedpeft_jax.privacy.config import default_privacy_config, validate_privacy

SECTIONS = ("model", "peft", "data", "federated", "privacy")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_TFDS_NAME = re.compile(r"^[a-z][a-z0-9_]*(/[a-z0-9_]+)?(:\d+\.\d+\.\d+)?$")


class ConfigError(ValueError):
  """An invalid experiment config; `field` is the dotted path, e.g. 'config.data.alpha'."""

  def __init__(self, message: str, field: str = ""):
    super().__init__(message)
    self.field = field


# ---------------------------------------------------------------------------
# Small helpers


def _fail(field: str, message: str) -> None:
  raise ConfigError(f"config.{field} {message}", field=f"config.{field}")


def _get(config: Any, field: str) -> Any:
  node = config
  for part in field.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      _fail(field, "is missing (build configs on configs/default.py)")
  return node


def _is_int(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int(config: Any, field: str, minimum: int) -> int:
  v = _get(config, field)
  if not _is_int(v):
    _fail(field, f"must be an integer >= {minimum}, got {v!r}")
  if v < minimum:
    _fail(field, f"must be >= {minimum}, got {v}")
  return int(v)


def _num(config: Any, field: str, low: float, high: float = math.inf, low_open: bool = False,
         high_open: bool = False) -> float:
  """A finite number in [low, high] (ends open where asked); the message shows the range."""
  v = _get(config, field)
  rng = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  if high == math.inf:
    rng = f"{'> ' if low_open else '>= '}{low:g}"
  if not _is_num(v):
    _fail(field, f"must be a finite number {rng}, got {v!r}")
  bad = (v < low or v > high or (low_open and v == low) or (high_open and v == high))
  if bad:
    _fail(field, f"must be {'in ' if high != math.inf else ''}{rng}, got {v}")
  return float(v)


def _bool(config: Any, field: str) -> bool:
  v = _get(config, field)
  if not isinstance(v, bool):
    _fail(field, f"must be True or False, got {v!r}")
  return v


def as_config_error(prefix: str | tuple[str, ...], fn: Callable[[], Any]) -> Any:
  """Runs `fn` (another module's validator, or a runner step that checks the config against
  the model), turning a ValueError whose message starts with a field under `prefix` (or under
  one of several prefixes) into a ConfigError (a one-line error at the command line)."""
  try:
    return fn()
  except ConfigError:
    raise
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    msg = str(e).strip("'\"")
    field = msg.split(" ", 1)[0].rstrip(":,")
    prefixes = (prefix,) if isinstance(prefix, str) else prefix
    if any(field.startswith(p + ".") or field == p for p in prefixes):
      raise ConfigError(f"config.{msg}", field=f"config.{field}") from e
    raise ConfigError(f"config.{prefixes[0]}: {msg}", field=f"config.{prefixes[0]}") from e


def parse_clients_per_chunk(value: Any) -> int | None:
  """'auto' -> None; a positive int (or its string, as the command line gives it) -> int."""
  if value == "auto":
    return None
  if _is_int(value) and value > 0:
    return int(value)
  if isinstance(value, str) and value.strip().isdigit() and int(value) > 0:
    return int(value)
  raise ConfigError(f"config.federated.clients_per_chunk must be 'auto' or a positive integer, "
                    f"got {value!r}", field="config.federated.clients_per_chunk")


# ---------------------------------------------------------------------------
# Allowed values beyond the implementing modules' constants


def known_datasets() -> tuple[str, ...]:
  """Names fedpeft_jax.data loads without further checks (local sets + curated TFDS)."""
  return tuple(list_datasets())


def _tfds_roots(data_dir: str) -> list[str]:
  roots = [data_dir] if data_dir else []
  roots.append(os.environ.get("TFDS_DATA_DIR", "") or os.path.expanduser("~/tensorflow_datasets"))
  return roots


def _prepared_tfds(name: str, data_dir: str) -> bool:
  """A TFDS dataset outside the curated list is accepted once prepared on disk."""
  path = name.split(":")[0]
  return any(os.path.isdir(os.path.join(root, path)) for root in _tfds_roots(data_dir) if root)


def _registry() -> dict[str, dict[str, Any]]:
  """Registry name -> the ViT kwargs its backbone was trained with (may be empty).

  Read at call time, not import time: register_checkpoint may add names after import.
  """
  return {name: dict(info.model_kwargs or {}) for name, info in REGISTRY.items()}


def known_pretrained() -> tuple[str, ...]:
  """Registry names of pre-trained checkpoints (fedpeft_jax.models.REGISTRY)."""
  return tuple(sorted(_registry()))


def _variant_sizes(variant: Any) -> dict[str, int] | None:
  """'B/16' -> the ViT sizes it stands for; None when it is not a variant name."""
  if not isinstance(variant, str):
    return None
  try:
    size, patch = parse_variant(variant)
  except ValueError:
    return None
  width, depth, mlp, heads = VARIANTS[size]
  return {"hidden_size": width, "depth": depth, "num_heads": heads, "mlp_dim": mlp,
          "patch_size": patch}


def _looks_like_path(value: str) -> bool:
  return ("/" in value or os.sep in value or value.startswith(("~", "."))
          or os.path.splitext(value)[1] != "" or os.path.exists(value))


# ---------------------------------------------------------------------------
# Sections


def _validate_top(config: Any) -> None:
  for section in SECTIONS:
    _get(config, section)
  seed = _get(config, "seed")
  if not _is_int(seed) or seed < 0:
    _fail("seed", f"must be an integer >= 0, got {seed!r}")
  _int(config, "checkpoint_every", 0)
  _int(config, "keep_checkpoints", 1)


def _validate_model(config: Any) -> dict[str, int]:
  """Checks config.model; returns the resolved sizes (hidden_size, depth, ...)."""
  sizes = {}
  for field in ("hidden_size", "depth", "num_heads", "mlp_dim", "patch_size"):
    sizes[field] = _int(config, f"model.{field}", 0)
  variant = _get(config, "model.variant")
  base = _variant_sizes(variant)
  if base:
    sizes = {k: v or base[k] for k, v in sizes.items()}
  elif not all(sizes.values()):
    missing = [k for k, v in sizes.items() if not v]
    _fail("model.variant", f"is {variant!r}, not '<size>/<patch>' with size in "
          f"{', '.join(VARIANTS)} (e.g. 'B/16'); without a variant set every one of "
          f"config.model.{{hidden_size, depth, num_heads, mlp_dim, patch_size}} > 0 "
          f"(missing: {', '.join(missing)})")
  if sizes["patch_size"] <= 0:
    _fail("model.patch_size", f"must be > 0, got {sizes['patch_size']}")
  if sizes["hidden_size"] % sizes["num_heads"]:
    _fail("model.num_heads", f"({sizes['num_heads']}) must divide the hidden size "
          f"({sizes['hidden_size']})")
  image = _int(config, "model.image_size", 1)
  if image % sizes["patch_size"]:
    _fail("model.image_size", f"({image}) must be a multiple of the patch size "
          f"({sizes['patch_size']})")
  as_config_error("model", lambda: check_pool(_get(config, "model.pool")))
  _int(config, "model.representation_size", 0)
  _num(config, "model.dropout", 0.0, 1.0, high_open=True)
  _num(config, "model.attention_dropout", 0.0, 1.0, high_open=True)
  as_config_error("model", lambda: check_model_dtype(_get(config, "model.dtype")))
  as_config_error("model", lambda: check_attention(_get(config, "model.attention")))
  pretrained = _get(config, "model.pretrained")
  if not isinstance(pretrained, str):
    _fail("model.pretrained", f"must be a path, URL, registry name or '', got {pretrained!r}")
  if pretrained and not _URL.match(pretrained) and not _looks_like_path(pretrained):
    registry = _registry()
    if pretrained not in registry:
      _fail("model.pretrained", f"is {pretrained!r}: not a path, URL or known registry name; "
            f"registry names: {', '.join(sorted(registry))} ('' = train from scratch)")
    _check_fits(pretrained, registry[pretrained], sizes, _get(config, "model.representation_size"))
  if not isinstance(_get(config, "model.cache_dir"), str):
    _fail("model.cache_dir", "must be a string ('' = the default cache)")
  return sizes


def _check_fits(name: str, kwargs: dict[str, Any], sizes: dict[str, int], rep: int) -> None:
  """A registered checkpoint must match the model's architecture (the resolution may
  differ: position embeddings are resampled)."""
  want = _variant_sizes(kwargs.get("variant"))
  if not want:
    return
  diff = [f"{k} {sizes[k]} vs {v}" for k, v in want.items() if sizes[k] != v]
  if diff:
    _fail("model.pretrained", f"{name!r} is a ViT-{kwargs['variant']} checkpoint and does not "
          f"fit the configured model (model vs checkpoint: {'; '.join(diff)}); set "
          f"config.model.variant={kwargs['variant']!r} and the size overrides to 0")
  ckpt_rep = int(kwargs.get("representation_size") or 0)
  if rep and rep != ckpt_rep:
    _fail("model.representation_size", f"({rep}) does not fit {name!r}, whose pre-logits "
          f"layer has size {ckpt_rep or 'none'}; use {ckpt_rep} or 0 (no pre-logits)")


def _validate_peft(config: Any, depth: int) -> None:
  peft = _get(config, "peft")
  _check_fields(peft, default_peft_config(), "peft")
  as_config_error("peft", lambda: validate_peft(peft))
  k = peft.get("last_blocks", 0)
  if k > depth:
    _fail("peft.last_blocks", f"({k}) exceeds the number of encoder blocks of the model "
          f"({depth}); set it to at most {depth}, or 0 to tune all blocks")


def _check_fields(node: Any, reference: Any, prefix: str) -> None:
  """Unknown fields (a misspelling in a hand-built config) are errors too."""
  keys = getattr(node, "keys", None)
  ref_keys = set(reference.keys())
  if keys is None:
    return
  for key in keys():
    if key not in ref_keys:
      _fail(f"{prefix}.{key}", f"is not a field; {prefix} has: {', '.join(sorted(ref_keys))}")
    if hasattr(reference[key], "keys"):
      _check_fields(node[key], reference[key], f"{prefix}.{key}")


def _validate_data(config: Any) -> None:
  name = _get(config, "data.dataset")
  data_dir = _get(config, "data.data_dir")
  if not isinstance(data_dir, str):
    _fail("data.data_dir", f"must be a string ('' = the library default), got {data_dir!r}")
  known = known_datasets()
  if (not isinstance(name, str) or name not in known) and not (
      isinstance(name, str) and _TFDS_NAME.match(name) and _prepared_tfds(name, data_dir)):
    _fail("data.dataset", f"is {name!r}; known: {', '.join(known)}. Any other TFDS "
          "image-classification dataset works once prepared under config.data.data_dir "
          "(python -m fedpeft_jax.data.prepare --dataset=NAME --data_dir=DIR)")
  method = as_config_error("data", lambda: check_method(_get(config, "data.partition")))
  if method == "dirichlet":
    _num(config, "data.alpha", 0.0, low_open=True)
  min_size = _int(config, "data.min_size", 0)
  if method == "shards":
    _int(config, "data.shards_per_client", 1)
  val_size = _num(config, "data.val_size", 0.0)
  if val_size >= 1 and val_size != int(val_size):
    _fail("data.val_size", f"is {val_size!r}: give a fraction in (0, 1), a whole count of "
          "examples, or 0 (no validation split)")
  if val_size and _bool(config, "data.sample_with_replacement"):
    _fail("data.val_size", "with config.data.sample_with_replacement=True: a drawn pool holds "
          "duplicates, so a held-out example could also be a client's; sample without "
          "replacement or set val_size=0")
  train_size = _int(config, "data.train_size", 0)
  num_clients = _get(config, "federated.num_clients")
  if train_size and _is_int(num_clients) and num_clients > 0:
    need = max(num_clients, min_size * num_clients if method == "dirichlet" else 0)
    # The validation split leaves the pool first.
    left = train_size - as_config_error("data", lambda: validation_count(val_size, train_size))
    if left < need:
      held = train_size - left
      _fail("data.train_size", f"({train_size}) is too small for {num_clients} clients"
            + (f" holding at least config.data.min_size ({min_size}) examples each"
               if method == "dirichlet" else "")
            + (f" after config.data.val_size holds out {held}" if held else "")
            + f"; need >= {need + held}")
  _bool(config, "data.sample_with_replacement")
  classes = _get(config, "data.classes")
  if not isinstance(classes, str):
    _fail("data.classes", f"must be a string of comma-separated class ids ('' = all), got "
          f"{classes!r}")
  as_config_error("data", lambda: parse_classes(classes))
  as_config_error("data", lambda: check_augment(_get(config, "data.augment"), auto=True))
  _int(config, "data.resolution", 1)
  _int(config, "data.host_resolution", 0)


def _validate_federated(config: Any) -> None:
  f = "federated."
  _int(config, f + "rounds", 1)
  n = _int(config, f + "num_clients", 1)
  per_round = _int(config, f + "clients_per_round", 0)
  if per_round > n:
    _fail(f + "clients_per_round", f"({per_round}) exceeds config.federated.num_clients ({n})")
  _num(config, f + "participation", 0.0, 1.0, low_open=True)
  steps = _int(config, f + "local_steps", 0)
  epochs = _get(config, f + "local_epochs")
  if steps == 0:
    _int(config, f + "local_epochs", 1)
  elif not _is_int(epochs) or epochs < 0:
    _fail(f + "local_epochs", f"must be an integer >= 0, got {epochs!r}")
  _int(config, f + "batch_size", 1)
  as_config_error("federated", lambda: check_client_optimizer(_get(config, f + "client_optimizer")))
  _num(config, f + "client_lr", 0.0, low_open=True)
  _num(config, f + "client_momentum", 0.0, 1.0, high_open=True)
  _bool(config, f + "client_nesterov")
  _num(config, f + "client_weight_decay", 0.0)
  _num(config, f + "label_smoothing", 0.0, 1.0, high_open=True)
  _num(config, f + "fedprox_mu", 0.0)
  as_config_error("federated", lambda: check_server_optimizer(_get(config, f + "server_optimizer")))
  _num(config, f + "server_lr", 0.0, low_open=True)
  as_config_error("federated",
                  lambda: check_server_lr_schedule(_get(config, f + "server_lr_schedule")))
  _num(config, f + "server_momentum", 0.0, 1.0, high_open=True)
  _num(config, f + "server_b1", 0.0, 1.0, high_open=True)
  _num(config, f + "server_b2", 0.0, 1.0, high_open=True)
  _num(config, f + "server_eps", 0.0, low_open=True)
  _bool(config, f + "server_bias_correction")
  as_config_error("federated", lambda: check_weighting(_get(config, f + "weighting")))
  _num(config, f + "dropout", 0.0, 1.0, high_open=True)
  as_config_error("federated",
                  lambda: check_client_sampling(_get(config, f + "client_sampling")))
  _num(config, f + "max_update_norm", 0.0)
  parse_clients_per_chunk(_get(config, f + "clients_per_chunk"))
  _int(config, f + "eval_every", 1)
  _int(config, f + "eval_batch_size", 1)
  as_config_error("federated", lambda: check_wire_dtype(_get(config, f + "wire_dtype")))
  as_config_error("federated", lambda: check_compression(
      _get(config, f + "compression"), _get(config, f + "compression_block"),
      _get(config, f + "compression_fraction")))
  as_config_error("federated", lambda: check_feature_cache(_get(config, f + "feature_cache")))


def _validate_personal(config: Any) -> None:
  f = "federated."
  personal = _get(config, f + "personal")
  patterns = as_config_error("federated", lambda: parse_patterns(personal))
  schedule = as_config_error("federated",
                             lambda: check_schedule(_get(config, f + "personal_schedule")))
  if schedule != "none" and not patterns:
    _fail(f + "personal_schedule", f"is {schedule!r} but config.federated.personal is empty; "
          "name the personal leaves, e.g. federated.personal=head")
  _int(config, f + "personal_epochs", 1)
  _int(config, f + "personal_finetune_epochs", 1)
  _bool(config, f + "eval_per_client")
  _int(config, f + "local_test_size", 0)
  rule = _get(config, "federated.lora_aggregation")
  if patterns and rule in FOLDING_AGGREGATIONS:
    _fail(f + "personal", f"with federated.lora_aggregation={rule!r}: the folded residual is "
          "defined for fully shared LoRA factors; use 'fedit' or 'ffa', or no personal leaves")
  mechanism = _get(config, "privacy.mechanism")
  if patterns and mechanism != "none":
    _fail(f + "personal", f"with privacy.mechanism={mechanism!r}: personal training is not "
          "in the privacy accounting; set federated.personal='' or privacy.mechanism=none")


def _validate_lora_aggregation(config: Any) -> None:
  """federated.lora_aggregation and peft.lora.client_ranks against the rest of the config
  (after the peft and federated sections, whose own fields are then known to be valid)."""
  field = "federated.lora_aggregation"
  rule = as_config_error("federated", lambda: check_rule(_get(config, field)))
  methods = parse_methods(_get(config, "peft.method"))
  ranks = _get(config, "peft.lora.client_ranks")
  if not isinstance(ranks, str):
    _fail("peft.lora.client_ranks", f"must be a string ('' = every client at "
          f"peft.lora.rank, 'r1,...,rK' or 'uniform:r1,r2,...'), got {ranks!r}")
  if rule != "fedit" and "lora" not in methods:
    _fail(field, f"is {rule!r}, which aggregates LoRA factors, but config.peft.method "
          f"({'+'.join(methods)!r}) has no lora; add lora or use 'fedit'")
  if rule in FOLDING_AGGREGATIONS:
    why = (f"(config.federated.lora_aggregation={rule!r} folds the plain mean of the client "
           "models into the frozen weights)")
    if "full" in methods:
      _fail("peft.method", f"includes 'full', which trains the LoRA targets' kernels; {why[1:-1]} "
            "and needs them frozen: drop 'full' or use lora_aggregation 'fedit'")
    server = _get(config, "federated.server_optimizer")
    if server != "fedavg":
      _fail("federated.server_optimizer", f"is {server!r}; it must be 'fedavg' {why}")
    lr = _get(config, "federated.server_lr")
    if lr != 1.0:
      _fail("federated.server_lr", f"is {lr}; it must be 1.0 {why}")
    schedule = _get(config, "federated.server_lr_schedule")
    if schedule != "constant":
      _fail("federated.server_lr_schedule", f"is {schedule!r}; it must be 'constant' {why}")
    if _get(config, "peft.lora.freeze_a"):
      _fail("peft.lora.freeze_a", f"is True; {why[1:-1]} from both trained factors, so A must "
            "train: set freeze_a=False (or use lora_aggregation 'ffa')")
  as_config_error(("federated", "privacy"), lambda: check_round(
      rule, _get(config, "federated.compression"), _get(config, "privacy.mechanism")))
  if ranks.strip():
    if rule != "flora":
      _fail("peft.lora.client_ranks", f"is {ranks!r} but config.federated.lora_aggregation is "
            f"{rule!r}; heterogeneous ranks need 'flora' (FedIT and FedEx-LoRA average "
            "factors of one shape)")
    as_config_error("peft", lambda: client_ranks(ranks, _get(config, "federated.num_clients"),
                                                 0, max_rank=_get(config, "peft.lora.rank")))


def _validate_privacy(config: Any) -> None:
  privacy = _get(config, "privacy")
  _check_fields(privacy, default_privacy_config(), "privacy")
  as_config_error("privacy", lambda: validate_privacy(privacy))
  if (_get(config, "federated.client_sampling") == "poisson"
      and privacy.mechanism == "dp_fedavg" and privacy.sampling != "poisson"):
    _fail("privacy.sampling", f"is {privacy.sampling!r} but config.federated.client_sampling "
          "is 'poisson': clients would be drawn by Poisson sampling and accounted as "
          "another draw; set privacy.sampling=poisson")


def validate_config(config: Any) -> None:
  """Raises ConfigError (a ValueError) naming the first invalid field; returns None.

  Checks types, ranges and allowed values of every field of configs/default.py, the
  PEFT and privacy sections through their own validators, and consistency between
  fields (clients_per_round <= num_clients, image_size a multiple of the patch, ...).
  Pure: no files are written and nothing is computed.
  """
  _validate_top(config)
  sizes = _validate_model(config)
  _validate_peft(config, sizes["depth"])
  _validate_federated(config)
  _validate_lora_aggregation(config)
  _validate_data(config)
  _validate_privacy(config)
  _validate_personal(config)
