"""PEFT method configuration.

One ConfigDict shape for every method, so a locked experiment config can switch
methods from the command line (`--config.peft.method=lora --config.peft.lora.rank=4`).
Several methods combine with `+` (`"bias+lora"`) or a list.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections

METHODS = ("full", "head", "bias", "prompt", "adapter", "lora", "ssf")
ADAPTER_KINDS = ("sequential", "houlsby", "parallel", "shared_zero_init")
PROMPT_KINDS = ("deep", "shallow")
LORA_TARGETS = ("query", "key", "value", "out", "mlp_fc1", "mlp_fc2")
ACTIVATIONS = ("gelu", "relu", "silu", "tanh")


def default_config() -> ml_collections.ConfigDict:
  """Every field of every method, with the study's defaults."""
  c = ml_collections.ConfigDict()
  c.method = "full"  # one of METHODS, or several joined by '+', e.g. 'bias+lora'.
  # k > 0: tune only the last k encoder blocks plus the top (encoder_norm, pre_logits, head);
  # PEFT modules exist only there and earlier blocks are frozen. 0 = all blocks.
  c.last_blocks = 0

  c.prompt = ml_collections.ConfigDict()
  c.prompt.kind = "deep"  # 'deep': new tokens before every block; 'shallow': once.
  c.prompt.num_tokens = 10
  c.prompt.dropout = 0.1

  c.adapter = ml_collections.ConfigDict()
  c.adapter.kind = "sequential"  # one of ADAPTER_KINDS.
  c.adapter.bottleneck = 96  # hidden size of the bottleneck; 0 -> use `reduction`.
  c.adapter.reduction = 0  # hidden // reduction when bottleneck == 0.
  c.adapter.activation = "gelu"
  c.adapter.scale = 0.1  # AdaptFormer's fixed scale ('parallel' only).

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 8
  c.lora.alpha = 8.0  # scaling alpha / rank (alpha / sqrt(rank) with rslora).
  c.lora.targets = "query,value"  # comma-separated subset of LORA_TARGETS.
  c.lora.rslora = False
  c.lora.dropout = 0.0
  c.lora.freeze_a = False  # FFA-LoRA: A stays at its random init; only B trains.
  # Per-client ranks for federated.lora_aggregation='flora' (heterogeneous LoRA): "" = every
  # client uses `rank`; "r1,...,rK" one per client; "uniform:r1,r2,..." each client draws one
  # (from the seed's data stream). Each in 1..rank: the model is built at `rank` and a
  # lower-rank client zero-pads its A columns / B rows (all clients scale by alpha / rank).
  c.lora.client_ranks = ""

  c.ssf = ml_collections.ConfigDict()
  c.ssf.init_std = 0.02  # gamma ~ N(1, std), beta ~ N(0, std); 0 -> identity init.
  return c


def method_config(method: str | Sequence[str] = "full",
                  **overrides: Any) -> ml_collections.ConfigDict:
  """A PEFT config for `method`; keyword overrides go to the method's section.

  `method_config("lora", rank=4)` sets `lora.rank`; for combinations pass
  section-qualified names, e.g. `method_config("bias+lora", lora_rank=4)`.
  `last_blocks=k` sets the top-level `last_blocks` for any method.
  """
  c = default_config()
  names = parse_methods(method)
  c.method = "+".join(names)
  for key, value in overrides.items():
    if key == "last_blocks":
      c.last_blocks = value
      continue
    section, field = _locate(names, key)
    if field not in c[section]:
      raise ValueError(
          f"peft.{section} has no field {field!r}; allowed: {sorted(c[section].keys())}")
    if section == "lora" and field == "targets" and not isinstance(value, str):
      value = ",".join(value)  # the field is a string so the command line can set it
    c[section][field] = value
  validate(c)
  return c


def _locate(names: Sequence[str], key: str) -> tuple[str, str]:
  for section in ("prompt", "adapter", "lora", "ssf"):
    if key.startswith(section + "_"):
      return section, key[len(section) + 1:]
  sections = [n for n in names if n in ("prompt", "adapter", "lora", "ssf")]
  if len(sections) != 1:
    raise ValueError(
        f"override {key!r} is ambiguous for method {'+'.join(names)!r}: "
        "prefix it with its section, e.g. lora_rank=4")
  return sections[0], key


def parse_methods(method: str | Iterable[str]) -> tuple[str, ...]:
  """'bias+lora' or ['bias', 'lora'] -> ('bias', 'lora'), validated."""
  if isinstance(method, str):
    names = [m.strip() for m in method.split("+")]
  else:
    names = [str(m).strip() for m in method]
  if not names or any(not n for n in names):
    raise ValueError(f"peft.method must name at least one of {METHODS}, got {method!r}")
  for n in names:
    if n not in METHODS:
      raise ValueError(f"peft.method: unknown method {n!r}; allowed: {', '.join(METHODS)} "
                       "(combine with '+')")
  return tuple(dict.fromkeys(names))


def lora_targets(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  raw = cfg.lora.targets
  names = [t.strip() for t in (raw.split(",") if isinstance(raw, str) else raw)]
  names = [t for t in names if t]
  for t in names:
    if t not in LORA_TARGETS:
      raise ValueError(f"peft.lora.targets: unknown target {t!r}; allowed: {', '.join(LORA_TARGETS)}")
  if not names:
    raise ValueError(f"peft.lora.targets is empty; choose from {', '.join(LORA_TARGETS)}")
  return tuple(names)


def validate(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Checks every field the chosen methods use; returns the method names."""
  names = parse_methods(cfg.method)
  last_blocks(cfg)
  if "prompt" in names:
    if cfg.prompt.kind not in PROMPT_KINDS:
      raise ValueError(f"peft.prompt.kind: {cfg.prompt.kind!r}; allowed: {', '.join(PROMPT_KINDS)}")
    if int(cfg.prompt.num_tokens) <= 0:
      raise ValueError(f"peft.prompt.num_tokens must be > 0, got {cfg.prompt.num_tokens}")
    if not 0.0 <= float(cfg.prompt.dropout) < 1.0:
      raise ValueError(f"peft.prompt.dropout must be in [0, 1), got {cfg.prompt.dropout}")
  if "adapter" in names:
    if cfg.adapter.kind not in ADAPTER_KINDS:
      raise ValueError(f"peft.adapter.kind: {cfg.adapter.kind!r}; allowed: {', '.join(ADAPTER_KINDS)}")
    if int(cfg.adapter.bottleneck) <= 0 and int(cfg.adapter.reduction) <= 0:
      raise ValueError("peft.adapter.bottleneck (or peft.adapter.reduction) must be > 0, got "
                       f"bottleneck={cfg.adapter.bottleneck}, reduction={cfg.adapter.reduction}")
    if cfg.adapter.activation not in ACTIVATIONS:
      raise ValueError(f"peft.adapter.activation: {cfg.adapter.activation!r}; allowed: {', '.join(ACTIVATIONS)}")
  if "lora" in names:
    if int(cfg.lora.rank) <= 0:
      raise ValueError(f"peft.lora.rank must be > 0, got {cfg.lora.rank}")
    if not 0.0 <= float(cfg.lora.dropout) < 1.0:
      raise ValueError(f"peft.lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    lora_targets(cfg)
    if not isinstance(cfg.lora.get("client_ranks", ""), str):
      raise ValueError(f"peft.lora.client_ranks must be a string ('' = every client at "
                       f"peft.lora.rank, 'r1,...,rK' or 'uniform:r1,r2,...'), got "
                       f"{cfg.lora.client_ranks!r}")
  if "ssf" in names and float(cfg.ssf.init_std) < 0:
    raise ValueError(f"peft.ssf.init_std must be >= 0, got {cfg.ssf.init_std}")
  return names


def last_blocks(cfg: Any) -> int:
  """The validated `peft.last_blocks` (0 = all blocks; a config without the field gives 0)."""
  k = cfg.get("last_blocks", 0)
  if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 0:
    raise ValueError(f"peft.last_blocks must be an integer >= 0 (the number of last encoder "
                     f"blocks to tune; 0 = all blocks), got {k!r}")
  return int(k)


def adapter_bottleneck(cfg: ml_collections.ConfigDict, hidden: int) -> int:
  if int(cfg.adapter.bottleneck) > 0:
    return int(cfg.adapter.bottleneck)
  return max(1, hidden // int(cfg.adapter.reduction))
