"""Vision Transformer (Dosovitskiy et al. 2021) as a pure-functional Flax Linen module.

Parameter names follow the Linen-converted Google layout (`embedding`, `cls`,
`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/query`, ...), so the
released checkpoints map one-to-one. PEFT methods (prompts, adapters, LoRA, SSF)
hook in through a `PeftSpec`; with `peft=None` the model is the plain ViT.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedpeft_jax.choices import one_of
from fedpeft_jax.peft.layers import LoRA, SSF, Adapter
from fedpeft_jax.peft.spec import PeftSpec, to_spec

Dtype = Any

# width, depth, mlp_dim, heads (ViT paper and big_vision).
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}
POOLS = ("token", "gap")


def parse_variant(variant: str) -> tuple[str, int]:
  """'B/16' -> ('B', 16)."""
  m = re.fullmatch(r"(Ti|S|M|B|L|H)/(\d+)", variant or "")
  if not m:
    raise ValueError(f"ViT variant {variant!r} not understood; expected '<size>/<patch>' with "
                     f"size in {', '.join(VARIANTS)} (e.g. 'B/16', 'Ti/4')")
  return m.group(1), int(m.group(2))


def _dense_init():
  return nn.initializers.xavier_uniform()


def _bias_init():
  return nn.initializers.normal(stddev=1e-6)


# config.model.attention: "auto" picks one of the others for the platform (choose_attention).
ATTENTION_IMPLEMENTATIONS = ("auto", "explicit", "xla", "cudnn")


def check_attention(requested: str) -> str:
  """model.attention: one of ATTENTION_IMPLEMENTATIONS."""
  return one_of("model.attention", requested, ATTENTION_IMPLEMENTATIONS)


def check_pool(pool: str) -> str:
  """model.pool: one of POOLS."""
  return one_of("model.pool", pool, POOLS)
CUDNN_MAX_HEAD_DIM = 128  # cuDNN flash attention's head-dim limit before Hopper (256 on sm_90)
CUDNN_MIN_CAPABILITY = (8, 0)  # JAX's cuDNN flash attention: Ampere or later


def choose_attention(requested: str, platform: str, dtype: Any, head_dim: int,
                     attention_dropout: float,
                     compute_capability: Optional[tuple[int, int]] = None) -> tuple[str, str]:
  """(implementation, why) for `config.model.attention` on `platform` ('cpu', 'gpu', 'tpu').

  "auto" takes cuDNN's fused attention where it applies: an NVIDIA GPU of compute capability
  CUDNN_MIN_CAPABILITY or later (`compute_capability`, None = not an NVIDIA GPU or unknown),
  a half-precision compute dtype, head dim a multiple of 8 and at most CUDNN_MAX_HEAD_DIM,
  no attention dropout; otherwise the explicit form. Asking for "cudnn" where it does not apply is an error
  naming why. The shape is checked here, but only a real GPU builds the cuDNN graph.
  """
  check_attention(requested)
  if requested in ("explicit", "xla"):
    return requested, "model.attention"
  blockers = []
  if platform != "gpu":
    blockers.append(f"platform {platform} is not a GPU")
  elif compute_capability is None or tuple(compute_capability) < CUDNN_MIN_CAPABILITY:
    blockers.append(f"GPU compute capability {compute_capability} is not NVIDIA "
                    f"{CUDNN_MIN_CAPABILITY[0]}.{CUDNN_MIN_CAPABILITY[1]} or later")
  if jnp.dtype(dtype).itemsize != 2:
    blockers.append(f"compute dtype {jnp.dtype(dtype).name} is not half precision")
  if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
    blockers.append(f"head dim {head_dim} is not a multiple of 8 up to {CUDNN_MAX_HEAD_DIM}")
  if attention_dropout > 0:
    blockers.append("attention dropout > 0")
  if requested == "cudnn" and blockers:
    raise ValueError(f"model.attention='cudnn' does not apply here ({'; '.join(blockers)}); "
                     "set it to 'auto' (cuDNN where it applies, else the explicit form)")
  if blockers:
    return "explicit", "auto: " + "; ".join(blockers)
  return "cudnn", ("model.attention" if requested == "cudnn" else
                   f"auto: {jnp.dtype(dtype).name} on GPU, head dim {head_dim}")


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     implementation: str = "cudnn") -> jax.Array:
  """Fused attention of [..., T, heads, head_dim] q/k/v (q already scaled), for cuDNN.

  Tokens are padded to an even count (JAX's cuDNN backward refuses odd ones) and masked by
  sequence length, then the padded query rows are cut off. `implementation="xla"` runs the
  same padding and masking through XLA (how the CPU tests check it)."""
  lead, tokens = q.shape[:-3], q.shape[-3]
  flat = lambda t: t.reshape((-1,) + t.shape[-3:])
  q, k, v = flat(q), flat(k), flat(v)
  pad = tokens % 2
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
  # The lengths are derived from q so that under vmap (clients of a chunk) they are batched
  # as q is: JAX's cuDNN batcher folds the vmapped axis into q's batch but reshapes
  # unbatched lengths to that size and fails.
  first = jax.lax.stop_gradient(q[:, 0, 0, 0])
  lengths = jnp.where(first == first, tokens, tokens).astype(jnp.int32)
  ctx = jax.nn.dot_product_attention(q, k, v, scale=1.0, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return ctx[:, :tokens].reshape(lead + (tokens,) + ctx.shape[-2:])


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with Google's DenseGeneral layout and LoRA/SSF hooks.

  q/k/v come from the `query/key/value` DenseGeneral layers ([..., T, heads, head_dim]);
  attention runs in the [..., heads, T, head_dim] layout (one transpose per operand, as
  the batched matmuls want) with a softmax whose backward saves only the probabilities in
  `dtype` (no float32 logits or probabilities are kept under bfloat16).

  `implementation` (see `choose_attention`, which picks it for a platform):
    "explicit": the einsum/softmax form above; on CPU as fast as the others and lighter
      (experiments/bench_vit_step.py).
    "xla": `jax.nn.dot_product_attention(implementation="xla")`.
    "cudnn": cuDNN's fused flash attention (forward and backward custom calls). JAX's
      cuDNN training path refuses an odd token count (ViT-B/16 at 224 has 197), so the
      tokens are padded to an even count and masked by sequence length; padded keys get no
      weight and padded query rows are dropped, which leaves the result unchanged.
  Attention dropout (dropout > 0, not deterministic) always takes the explicit form, which
  drops attention probabilities with nn.Dropout.
  """
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  peft: PeftSpec = PeftSpec()
  implementation: str = "explicit"

  @staticmethod
  def _probs(logits: jax.Array, dtype: Dtype) -> jax.Array:
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)

  @staticmethod
  def _probs_fwd(logits: jax.Array, dtype: Dtype) -> tuple[jax.Array, jax.Array]:
    p = MultiHeadDotProductAttention._probs(logits, dtype)
    return p, p  # the only residual: the probabilities in `dtype`

  @staticmethod
  def _probs_bwd(dtype: Dtype, p: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    del dtype
    p, g = p.astype(jnp.float32), g.astype(jnp.float32)
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)

  # Softmax of float32 logits over the last axis, returned and saved for the backward in dtype.
  probs = jax.custom_vjp(_probs.__func__, nondiff_argnums=(1,))
  probs.defvjp(_probs_fwd.__func__, _probs_bwd.__func__)
  probs = staticmethod(probs)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"hidden_size {width} is not divisible by num_heads {self.num_heads}")
    heads, head_dim, dt = self.num_heads, width // self.num_heads, self.dtype
    peft = self.peft

    def project(name: str) -> jax.Array:  # [..., T, D] -> [..., T, heads, head_dim]
      y = nn.DenseGeneral((heads, head_dim), dtype=dt, kernel_init=_dense_init(),
                          bias_init=nn.initializers.zeros, name=name)(x)
      if name in peft.lora_targets:
        y = y + LoRA(peft.lora_rank, (heads, head_dim), peft.lora_scaling, peft.lora_dropout,
                     dt, name=f"{name}_lora")(x, deterministic)
      if peft.ssf:
        y = SSF(2, peft.ssf_init_std, name=f"{name}_ssf")(y)
      return y

    q, k, v = project("query"), project("key"), project("value")
    q = q * jnp.asarray(1.0 / np.sqrt(head_dim), q.dtype)  # fuses into the layout change

    dropout = self.dropout > 0 and not deterministic
    if self.implementation not in ATTENTION_IMPLEMENTATIONS[1:]:
      raise ValueError(f"attention implementation {self.implementation!r}; allowed: "
                       f"{', '.join(ATTENTION_IMPLEMENTATIONS[1:])}")
    if self.implementation == "cudnn" and not dropout:
      ctx = padded_attention(q, k, v)
    elif self.implementation == "xla" and not dropout:
      ctx = jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation="xla")
    else:
      bnth = lambda t: jnp.swapaxes(t, -3, -2)  # [..., T, N, H] -> [..., N, T, H]
      logits = jnp.einsum("...qd,...kd->...qk", bnth(q), bnth(k),
                          preferred_element_type=jnp.float32)
      weights = self.probs(logits, dt)
      weights = nn.Dropout(self.dropout, deterministic=deterministic)(weights)
      ctx = bnth(jnp.einsum("...qk,...kd->...qd", weights, bnth(v)))
    out = nn.DenseGeneral(width, axis=(-2, -1), dtype=dt, kernel_init=_dense_init(),
                          bias_init=nn.initializers.zeros, name="out")(ctx)
    if "out" in peft.lora_targets:
      flat = ctx.reshape(*ctx.shape[:-2], width)
      out = out + LoRA(peft.lora_rank, (width,), peft.lora_scaling, peft.lora_dropout,
                       dt, name="out_lora")(flat, deterministic)
    if peft.ssf:
      out = SSF(1, peft.ssf_init_std, name="out_ssf")(out)
    return out


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float = 0.0
  gelu_approximate: bool = False
  dtype: Dtype = jnp.float32
  peft: PeftSpec = PeftSpec()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    width = x.shape[-1]
    peft = self.peft

    def dense(features: int, inputs: jax.Array, index: int) -> jax.Array:
      y = nn.Dense(features, dtype=self.dtype, kernel_init=_dense_init(), bias_init=_bias_init(),
                   name=f"Dense_{index}")(inputs)
      if f"mlp_fc{index + 1}" in peft.lora_targets:
        y = y + LoRA(peft.lora_rank, (features,), peft.lora_scaling, peft.lora_dropout,
                     self.dtype, name=f"Dense_{index}_lora")(inputs, deterministic)
      if peft.ssf:
        y = SSF(1, peft.ssf_init_std, name=f"Dense_{index}_ssf")(y)
      return y

    # The tokens as one (batch x tokens, width) matrix: vmapped over a chunk of clients,
    # XLA:GPU may lay the hidden activation out as (client, mlp_dim, batch, tokens) for the
    # bias/SSF gradient's reduction, and its Triton GEMM then finds no tile of the
    # batch x 197-token rows (197 is prime) to feed fc2: "Couldn't find output tile sizes"
    # with default flags at 8 clients per chunk. Merged rows (64 x 197) tile.
    lead = x.shape[:-1]
    x = x.reshape(-1, width)
    h = dense(self.mlp_dim, x, 0)
    if self.gelu_approximate:
      h = nn.gelu(h, approximate=True)
    else:  # erf form, as torch: cheaper on XLA:CPU than jax.nn.gelu's erfc form
      h = 0.5 * h * (1.0 + jax.lax.erf(h * 0.7071067811865476))
    h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
    h = dense(width, h, 1)
    return nn.Dropout(self.dropout, deterministic=deterministic)(h).reshape(*lead, width)


class Encoder1DBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  gelu_approximate: bool = False
  layernorm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  peft: PeftSpec = PeftSpec()
  shared_adapter: Optional[nn.Module] = None
  attention: str = "explicit"  # MultiHeadDotProductAttention.implementation

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    peft = self.peft

    def norm(name: str, inputs: jax.Array) -> jax.Array:
      y = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype, name=name)(inputs)
      return SSF(1, peft.ssf_init_std, name=f"{name}_ssf")(y) if peft.ssf else y

    def adapter(name: str) -> Adapter:
      return Adapter(peft.bottleneck(x.shape[-1]), peft.adapter_activation, dtype=self.dtype,
                     name=name)

    kind = peft.adapter_kind if peft.has("adapter") else ""
    y = norm("LayerNorm_0", x)
    y = MultiHeadDotProductAttention(self.num_heads, self.attention_dropout, self.dtype, peft,
                                     self.attention,
                                     name="MultiHeadDotProductAttention_0")(y, deterministic)
    y = nn.Dropout(self.dropout, deterministic=deterministic)(y)
    if kind == "houlsby":
      y = y + adapter("adapter_attn")(y)
    x = x + y

    y = norm("LayerNorm_1", x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.gelu_approximate, self.dtype, peft,
                 name="MlpBlock_0")(y, deterministic)
    if kind in ("sequential", "houlsby"):
      y = y + adapter("adapter_mlp")(y)
    elif kind == "parallel":
      y = y + peft.adapter_scale * adapter("adapter_mlp")(x)
    elif kind == "shared_zero_init":
      y = y + self.shared_adapter(y)
    return x + y


class Encoder(nn.Module):
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  gelu_approximate: bool = False
  layernorm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  peft: PeftSpec = PeftSpec()
  patch_size: int = 16
  attention: str = "explicit"

  @nn.compact
  def __call__(self, x: jax.Array, num_prefix: int, deterministic: bool = True, *,
               start_block: int = 0, stop_block: Optional[int] = None,
               tokens_in: bool = False) -> jax.Array:
    """x: [batch, tokens, width] with `num_prefix` leading tokens (class) before patches.

    Runs blocks start_block..stop_block-1. With `tokens_in`, x is the token activations
    entering block `start_block` (what `stop_block=start_block` returned); otherwise x is
    the embedded patches (+ class token) and the position embedding is added first. With
    `stop_block` set, returns the tokens entering that block (before its prompt insertion;
    before encoder_norm when it equals depth); otherwise the normalised encoder output.
    """
    peft = self.peft
    width = x.shape[-1]
    stop = self.depth if stop_block is None else stop_block
    if peft.last_blocks > self.depth:
      raise ValueError(f"peft.last_blocks ({peft.last_blocks}) exceeds the number of encoder "
                       f"blocks ({self.depth}); set it to at most {self.depth}, or 0 for all")
    # Blocks >= `first` are tuned: only they hold PEFT modules and take prompts.
    first = self.depth - peft.last_blocks if peft.last_blocks else 0
    if not tokens_in:
      posemb = _AddPositionEmbs(name="posembed_input")
      x = posemb(x)
      x = nn.Dropout(self.dropout, deterministic=deterministic, name="Dropout_0")(x)
    prompts = None
    if peft.has("prompt"):
      # VPT: uniform(-v, v), v = sqrt(6 / (3 * patch_h * patch_w + hidden)).
      bound = float(np.sqrt(6.0 / (3 * self.patch_size * self.patch_size + width)))
      layers = self.depth - first if peft.prompt_kind == "deep" else 1
      prompts = self.param(
          "vpt_prompts", lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound),
          (layers, peft.prompt_tokens, width))
    shared = None
    if peft.has("adapter") and peft.adapter_kind == "shared_zero_init":
      shared = Adapter(peft.bottleneck(width), peft.adapter_activation, zero_init_down=True,
                       dtype=self.dtype, name="shared_adapter")

    def with_prompt(h: jax.Array, layer: int, replace: bool) -> jax.Array:
      p = jnp.broadcast_to(prompts[layer].astype(h.dtype), (h.shape[0],) + prompts.shape[1:])
      # Named as the full forward pass auto-names them (Dropout_0 is the embedding's), so a
      # split forward draws the same dropout masks.
      p = nn.Dropout(peft.prompt_dropout, deterministic=deterministic,
                     name=f"Dropout_{1 + layer}")(p)
      rest = h[:, num_prefix + peft.prompt_tokens:] if replace else h[:, num_prefix:]
      return jnp.concatenate([h[:, :num_prefix], p, rest], axis=1)

    for i in range(start_block, stop):
      if prompts is not None and (i == first or (i > first and peft.prompt_kind == "deep")):
        x = with_prompt(x, i - first, replace=i > first)
      tuned = i >= first
      x = Encoder1DBlock(self.num_heads, self.mlp_dim, self.dropout, self.attention_dropout,
                         self.gelu_approximate, self.layernorm_epsilon, self.dtype,
                         peft if tuned else PeftSpec(), shared_adapter=shared if tuned else None,
                         attention=self.attention, name=f"encoderblock_{i}")(x, deterministic)
    if stop_block is not None:
      return x
    y = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype, name="encoder_norm")(x)
    if peft.ssf:
      y = SSF(1, peft.ssf_init_std, name="encoder_norm_ssf")(y)
    return y


class ViT(nn.Module):
  """ViT classifier. `ViT(variant="B/16", num_classes=100, image_size=224)`.

  Explicit `hidden_size`, `depth`, `num_heads`, `mlp_dim`, `patch_size` override the
  variant (for tiny test models). Inputs are NHWC images scaled to [-1, 1].
  """
  variant: Optional[str] = "B/16"
  num_classes: int = 1000
  image_size: int = 224
  hidden_size: Optional[int] = None
  depth: Optional[int] = None
  num_heads: Optional[int] = None
  mlp_dim: Optional[int] = None
  patch_size: Optional[int] = None
  pool: str = "token"
  class_token: Optional[bool] = None  # default: True for 'token' pooling, False for 'gap'.
  representation_size: Optional[int] = None
  gelu_approximate: bool = False
  layernorm_epsilon: float = 1e-6
  dropout: float = 0.0
  attention_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  peft: Any = None  # ConfigDict from peft.method_config, a method name, a PeftSpec or None.
  attention: str = "explicit"  # an implementation, not "auto": see choose_attention

  # -- resolved architecture -------------------------------------------------
  def arch(self) -> dict[str, int]:
    """Width, depth, heads, mlp_dim and patch size after overrides."""
    if self.variant is not None:
      size, patch = parse_variant(self.variant)
      width, depth, mlp, heads = VARIANTS[size]
    else:
      width = depth = mlp = heads = patch = None
    out = {
        "hidden_size": self.hidden_size or width,
        "depth": self.depth or depth,
        "num_heads": self.num_heads or heads,
        "mlp_dim": self.mlp_dim or mlp,
        "patch_size": self.patch_size or patch,
    }
    missing = [k for k, v in out.items() if not v]
    if missing:
      raise ValueError(f"ViT: with variant=None set {', '.join(missing)} explicitly")
    check_pool(self.pool)
    if self.image_size % out["patch_size"]:
      raise ValueError(f"ViT.image_size {self.image_size} is not a multiple of patch_size "
                       f"{out['patch_size']}")
    return out

  @property
  def uses_class_token(self) -> bool:
    return self.pool == "token" if self.class_token is None else bool(self.class_token)

  @property
  def grid_size(self) -> int:
    return self.image_size // self.arch()["patch_size"]

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False, return_features: bool = False,
               start_block: int = 0, stop_block: Optional[int] = None,
               from_features: bool = False) -> jax.Array:
    """Logits [batch, classes] float32 of NHWC `images` (or pooled features).

    Split forward (for caching the frozen prefix; see docs/peft.md, "Tuning only the last blocks"):
    `stop_block=s` returns the tokens entering encoder block s ([batch, tokens, width],
    compute dtype; s == depth: after the last block, before encoder_norm).
    `start_block=s` takes such tokens instead of images and runs the rest of the model.
    `from_features=True` takes what `return_features=True` returns and applies the head.
    """
    a = self.arch()
    peft = to_spec(self.peft)
    width, patch, depth = a["hidden_size"], a["patch_size"], a["depth"]
    deterministic = not train
    if self.pool == "token" and not self.uses_class_token:
      raise ValueError("ViT: pool='token' needs class_token=True")
    num_prefix = 1 if self.uses_class_token else 0
    tokens_in = start_block > 0 or images.ndim == 3
    self._check_split(images, start_block, stop_block, from_features, return_features, depth,
                      width, tokens_in)

    if from_features:
      x = images
    else:
      if tokens_in:
        x = images.astype(self.dtype)
      else:
        x = nn.Conv(width, (patch, patch), strides=(patch, patch), padding="VALID",
                    dtype=self.dtype, name="embedding")(images.astype(self.dtype))
        if peft.ssf and not peft.last_blocks:
          x = SSF(1, peft.ssf_init_std, name="embedding_ssf")(x)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        if self.uses_class_token:
          cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
          x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, c)), x], axis=1)

      encoder = Encoder(depth, a["num_heads"], a["mlp_dim"], self.dropout,
                        self.attention_dropout, self.gelu_approximate, self.layernorm_epsilon,
                        self.dtype, peft, patch, self.attention, name="Transformer")
      x = encoder(x, num_prefix, deterministic, start_block=start_block, stop_block=stop_block,
                  tokens_in=tokens_in)
      if stop_block is not None:
        return x

      if self.pool == "token":
        x = x[:, 0]
      else:
        skip = num_prefix + (peft.prompt_tokens if peft.has("prompt") else 0)
        x = jnp.mean(x[:, skip:], axis=1)
      if self.representation_size is not None:
        x = jnp.tanh(nn.Dense(self.representation_size, dtype=self.dtype, name="pre_logits")(x))
      if return_features:
        return x
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                      bias_init=nn.initializers.zeros, name="head")(x)
    return logits.astype(jnp.float32)


  def _check_split(self, x: jax.Array, start_block: int, stop_block: Optional[int],
                   from_features: bool, return_features: bool, depth: int, width: int,
                   tokens_in: bool) -> None:
    """Clear errors for split-forward arguments that do not fit the model or the input."""
    if not 0 <= start_block <= depth:
      raise ValueError(f"ViT: start_block must be in [0, {depth}] (the depth), got {start_block}")
    if stop_block is not None and not start_block <= stop_block <= depth:
      raise ValueError(f"ViT: stop_block must be in [start_block={start_block}, {depth}] "
                       f"(the depth), got {stop_block}")
    if from_features:
      if start_block or stop_block is not None or return_features:
        raise ValueError("ViT: from_features=True applies only the head; it does not combine "
                         "with start_block, stop_block or return_features")
      feat = self.representation_size if self.representation_size is not None else width
      if x.ndim != 2 or x.shape[-1] != feat:
        raise ValueError(f"ViT: from_features=True expects pooled features [batch, {feat}] "
                         f"(what return_features=True returns), got shape {tuple(x.shape)}")
    elif tokens_in:
      if x.ndim != 3 or x.shape[-1] != width:
        raise ValueError(f"ViT: start_block={start_block} expects the tokens entering that block "
                         f"[batch, tokens, {width}] (what stop_block={start_block} returns), got "
                         f"shape {tuple(x.shape)}")
    elif x.ndim != 4:
      raise ValueError(f"ViT: expected NHWC images [batch, height, width, channels], got shape "
                       f"{tuple(x.shape)}")


class _AddPositionEmbs(nn.Module):
  """Learned position embedding, stored as posembed_input/pos_embedding (1, tokens, width)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
    return x + pe.astype(x.dtype)
