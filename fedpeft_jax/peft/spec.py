"""A frozen, hashable view of a PEFT config that modules can hold as an attribute."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import ml_collections

from fedpeft_jax.peft import config as peft_config


@dataclasses.dataclass(frozen=True)
class PeftSpec:
  methods: tuple[str, ...] = ("full",)
  # k > 0: PEFT modules only in the last k encoder blocks (+ the top); 0 = all blocks.
  last_blocks: int = 0
  # prompt
  prompt_kind: str = "deep"
  prompt_tokens: int = 0
  prompt_dropout: float = 0.0
  # adapter
  adapter_kind: str = ""
  adapter_bottleneck: int = 0
  adapter_reduction: int = 0
  adapter_activation: str = "gelu"
  adapter_scale: float = 0.1
  # lora
  lora_targets: tuple[str, ...] = ()
  lora_rank: int = 0
  lora_scaling: float = 1.0
  lora_dropout: float = 0.0
  lora_freeze_a: bool = False
  # ssf
  ssf: bool = False
  ssf_init_std: float = 0.02

  def has(self, method: str) -> bool:
    return method in self.methods

  def bottleneck(self, hidden: int) -> int:
    if self.adapter_bottleneck > 0:
      return self.adapter_bottleneck
    return max(1, hidden // self.adapter_reduction)


def to_spec(cfg: Optional[Any]) -> PeftSpec:
  """ConfigDict | PeftSpec | method string | None -> PeftSpec (validated)."""
  if cfg is None:
    return PeftSpec()
  if isinstance(cfg, PeftSpec):
    return cfg
  if isinstance(cfg, str):
    cfg = peft_config.method_config(cfg)
  if not isinstance(cfg, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    raise TypeError(f"peft must be a ConfigDict from peft.method_config, a method name or None; "
                    f"got {type(cfg).__name__}")
  names = peft_config.validate(cfg)
  kw: dict[str, Any] = {"methods": names, "last_blocks": peft_config.last_blocks(cfg)}
  if "prompt" in names:
    kw.update(prompt_kind=cfg.prompt.kind, prompt_tokens=int(cfg.prompt.num_tokens),
              prompt_dropout=float(cfg.prompt.dropout))
  if "adapter" in names:
    kw.update(adapter_kind=cfg.adapter.kind, adapter_bottleneck=int(cfg.adapter.bottleneck),
              adapter_reduction=int(cfg.adapter.reduction),
              adapter_activation=cfg.adapter.activation, adapter_scale=float(cfg.adapter.scale))
  if "lora" in names:
    rank = int(cfg.lora.rank)
    denom = math.sqrt(rank) if cfg.lora.rslora else rank
    kw.update(lora_targets=peft_config.lora_targets(cfg), lora_rank=rank,
              lora_scaling=float(cfg.lora.alpha) / denom, lora_dropout=float(cfg.lora.dropout),
              lora_freeze_a=bool(cfg.lora.freeze_a))
  if "ssf" in names:
    kw.update(ssf=True, ssf_init_std=float(cfg.ssf.init_std))
  return PeftSpec(**kw)
