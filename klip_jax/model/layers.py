"""Transformer building blocks shared by the image and text towers.

Every parameter is created with logical axis names (`nnx.with_partitioning`); the mapping to
mesh axes is data (the config's rules), not model code. Activations get logical constraints
at block boundaries so GSPMD keeps the batch sharded the way the rules say.
Choices that decide numerical parity with Hugging Face BLIP are explicit options here: exact
vs tanh GELU, LayerNorm epsilon, fused vs split q/k/v projections.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, struct

Dtype = jnp.dtype


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh/rules context)."""
  return nn.with_logical_constraint(x, names)


def gelu(approximate: bool) -> Callable[[jax.Array], jax.Array]:
  """tanh GELU, or exact GELU as PyTorch writes it (nn.GELU, HF BLIP's "gelu"):
  x / 2 * (1 + erf(x / sqrt 2)). jax.nn.gelu's exact form, x / 2 * erfc(-x / sqrt 2), is the same
  function, but XLA:CPU expands erfc into exponentials and range selects that it re-evaluates in
  several fusions of the backward pass: the erf form made the small config's vision tower
  (forward + backward) 3% faster, and its values match PyTorch's formula term for term."""
  if approximate:
    return lambda x: jax.nn.gelu(x, approximate=True)
  return lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))  # Python floats keep x's dtype


def dense(in_features: int, out_features: int, names: tuple[str | None, str | None], *,
          dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs, std: float = 0.02,
          use_bias: bool = True) -> nnx.Linear:
  """A Linear with truncated-normal(std) kernel and zero bias, both with logical names."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(nnx.initializers.truncated_normal(std), names),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
      rngs=rngs)


def layer_norm(features: int, eps: float, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      features, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
      rngs=rngs)


def _softmax_attention(q, k, v, mask: jax.Array | None, *, kv_layout: str) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v with float32 scores; q [B, T, heads, head_dim], k and v
  laid out as `kv_layout` ("bsnd" or heads-first "bnsd"); -> [B, T, heads, head_dim].

  The scores leave the product in float32 (bf16 inputs accumulate in float32 anyway), as in
  jax.nn.dot_product_attention: rounding them to bf16 first put errors of ~0.1 on outputs of
  peaked attention, and the cached decoder step (always this path) then disagreed with a full
  forward pass by as much on TPUs and GPUs."""
  logits = jnp.einsum(f"btnd,{kv_layout}->bnts", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jnp.einsum(f"bnts,{kv_layout}->btnd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def resolve_attention(implementation: str, dtype: Dtype) -> str:
  """"auto" is cuDNN's fused attention where it runs (an NVIDIA GPU, bfloat16 compute), XLA's
  elsewhere. On an H200 (configs/base.py, batch 64) cuDNN made the train step 1.25x as fast (263
  images/s against 211) and relabelling 1.28x (361 captions/s against 281)."""
  if implementation != "auto":
    return implementation
  return "cudnn" if jax.default_backend() == "gpu" and jnp.dtype(dtype) == jnp.bfloat16 else "xla"


@struct.dataclass
class TextMask:
  """Which keys a text query may attend to: its row's real tokens (`valid` [B, S], True for a
  real token) and, when `causal`, none after its own position.

  Kept in this form rather than as a [B, 1, T, S] boolean because cuDNN's fused attention takes
  padding as per-row key counts and causality as a flag, and never reads a mask tensor (a mask
  would become an additive bias that it also differentiates). Our captions are padded at the
  end, so a row's real tokens are its first `valid.sum()` keys."""
  valid: jax.Array
  causal: bool = struct.field(pytree_node=False, default=False)

  def dense(self, q_len: int) -> jax.Array:
    """The same mask as a boolean broadcastable to [B, heads, q_len, S]."""
    keep = self.valid[:, None, None, :]
    if self.causal:
      keep = keep & jnp.tril(jnp.ones((q_len, self.valid.shape[1]), bool))[None, None]
    return keep

  def lengths(self) -> jax.Array:
    return self.valid.sum(-1).astype(jnp.int32)


def _cudnn_attention(q, k, v, mask: TextMask | None) -> jax.Array:
  """cuDNN's fused attention. Its training kernels take even lengths only (jax 0.11: "Unsupported
  sequence length Q 197, KV 197", a ViT-B/16's 1 + 14 x 14 tokens), so an odd length gets one
  padding position: a padding key is left out by the key counts, a padding query's row dropped."""
  t, s = q.shape[1], k.shape[1]
  lengths = None if mask is None else mask.lengths()
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
  if s % 2:
    k, v = pad(k), pad(v)
    lengths = jnp.full((k.shape[0],), s, jnp.int32) if lengths is None else lengths
  if t % 2:
    q = pad(q)
  out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn", is_causal=mask is not None and mask.causal,
                                     key_value_seq_lengths=lengths)
  return out[:, :t]


class Attention(nnx.Module):
  """Multi-head attention, self or cross, with fused (ViT/BLIP vision) or split (BERT) q/k/v.

  The fused kernel is stored as [embed, 3, heads*head_dim] (q, k, v along the middle axis) so
  tensor parallelism splits heads, never the q|k|v boundary.
  """

  def __init__(self, width: int, heads: int, *, kv_width: int | None = None, fused_qkv: bool,
               std: float, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs, implementation: str = "auto"):
    if width % heads:
      raise ValueError(f"width {width} is not divisible by {heads} heads")
    if implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"unknown attention implementation {implementation!r}; use one of {ATTENTION_IMPLEMENTATIONS}")
    self.heads, self.head_dim, self.dtype = heads, width // heads, dtype
    self.implementation = resolve_attention(implementation, dtype)
    kv_width = kv_width or width
    self.fused_qkv = fused_qkv
    if fused_qkv:
      if kv_width != width:
        raise ValueError("a fused q/k/v projection needs equal query and key/value widths")
      self.qkv = nnx.LinearGeneral(
          width, (3, width), dtype=dtype, param_dtype=param_dtype,
          kernel_init=nnx.with_partitioning(nnx.initializers.truncated_normal(std), ("embed", None, "heads")),
          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None, "heads")),
          rngs=rngs)
    else:
      kw = dict(std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      self.query = dense(width, width, ("embed", "heads"), **kw)
      self.key = dense(kv_width, width, ("embed", "heads"), **kw)
      self.value = dense(kv_width, width, ("embed", "heads"), **kw)
    self.out = dense(width, width, ("heads", "embed"), std=std, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)

  def _split(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

  def project(self, x: jax.Array, context: jax.Array | None = None):
    """q, k, v as [batch, length, heads, head_dim]; k, v from `context` for cross-attention."""
    if self.fused_qkv:
      q, k, v = (self._split(t) for t in jnp.moveaxis(self.qkv(x), -2, 0))
      return q, k, v
    return (self.queries(x), *self.keys_values(x if context is None else context))

  def queries(self, x: jax.Array) -> jax.Array:
    return self._split(self.query(x))

  def keys_values(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """k, v of `context` alone: what a decoder caches (split q/k/v layout only)."""
    return self._split(self.key(context)), self._split(self.value(context))

  def attend(self, q, k, v, mask: TextMask | None) -> jax.Array:
    """q [B, T, heads, head_dim] over k, v [B, S, heads, head_dim]; `mask` None: every key.

    "cudnn" (`resolve_attention`) runs cuDNN's fused (flash) attention on NVIDIA GPUs, given
    padding as key counts and causality as a flag. "xla" is XLA's own products and softmax; bf16
    on the CPU takes the written-out products there: XLA:CPU (jaxlib 0.10) cannot compile the
    backward of jax.nn.dot_product_attention's bf16 dots ("UNIMPLEMENTED: Dot with multiple
    contracting dimensions"), which made every bf16 config's train step fail there."""
    q = constrain(q, ("batch", "length", "act_heads", None))
    if self.implementation == "cudnn":
      if jax.default_backend() != "gpu":
        raise ValueError(f"attention 'cudnn' runs on NVIDIA GPUs only, not on {jax.default_backend()}: "
                         "set the towers' attention to 'xla'")
      out = _cudnn_attention(q, k, v, mask)
    elif q.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
      out = _softmax_attention(q, k, v, None if mask is None else mask.dense(q.shape[1]), kv_layout="bsnd")
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask.dense(q.shape[1]))
    return self.out(out.reshape(*out.shape[:-2], -1))

  def attend_cached(self, q, k, v, mask: jax.Array | None) -> jax.Array:
    """Attention of a few new queries q [B, T, heads, head_dim] over cached keys/values kept
    heads-first, [B, heads, S, head_dim]: the layout the score and value products read, so a
    decoding step does not transpose the whole cache (which dominated greedy decoding)."""
    out = _softmax_attention(q, k, v, mask, kv_layout="bnsd")
    return self.out(out.reshape(*out.shape[:-2], -1))

  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               mask: TextMask | None = None) -> jax.Array:
    return self.attend(*self.project(x, context), mask)


def heads_first(x: jax.Array) -> jax.Array:
  """[B, S, heads, head_dim] -> [B, heads, S, head_dim], the layout of decoder caches."""
  return jnp.swapaxes(x, 1, 2)


class Mlp(nnx.Module):
  def __init__(self, width: int, hidden: int, *, approximate_gelu: bool, std: float,
               dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = dense(width, hidden, ("embed", "mlp"), **kw)
    self.fc2 = dense(hidden, width, ("mlp", "embed"), **kw)
    self.act = gelu(approximate_gelu)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = constrain(self.act(self.fc1(x)), ("batch", "length", "act_mlp"))
    return self.fc2(h)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def maybe_remat(fn: Callable, policy: str) -> Callable:
  """Wrap a block's apply function in nnx.remat with a named policy ("none": unchanged)."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {policy!r}; use one of {sorted(REMAT_POLICIES)}")
  if policy == "none":
    return fn
  return nnx.remat(fn, policy=REMAT_POLICIES[policy])


def stack(make: Callable[[nnx.Rngs], nnx.Module], depth: int, rngs: nnx.Rngs, scan: bool):
  """`depth` layers from `make`: a list, or (scan) one module whose parameters carry a leading
  "layers" axis, created under nnx.vmap so each layer gets its own initialisation."""
  if not scan:
    return nnx.List([make(rngs) for _ in range(depth)])

  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(layer_rngs: nnx.Rngs) -> nnx.Module:
    return make(layer_rngs)

  return create(rngs)


def run_stack(stacked, x: jax.Array, fn: Callable, scan: bool, remat: str, *shared) -> jax.Array:
  """x <- fn(layer, x, *shared) for each layer, as a Python loop or one nnx.scan (fast
  compiles for deep models); `shared` arguments are the same for every layer."""
  body = maybe_remat(fn, remat)
  if not scan:
    for layer in stacked:
      x = body(layer, x, *shared)
    return x

  @nnx.scan(in_axes=(0, nnx.Carry) + (None,) * len(shared), out_axes=nnx.Carry,
            transform_metadata={nnx.PARTITION_NAME: "layers"})
  def run(layer, carry, *args):
    return body(layer, carry, *args)

  return run(stacked, x, *shared)


def run_stack_cached(stacked, x: jax.Array, fn: Callable, scan: bool, caches, *shared):
  """Like run_stack for fn(layer, x, cache, *shared) -> (x, new_cache), where `caches` (or None)
  holds one cache per layer: a tuple of them, or when scanned, stacked along a leading axis.
  Returns (x, the new caches held the same way). A layer loop keeps a tuple because slicing
  each layer's cache out of a stack and stacking them back copies every cache once per
  decoding step (a third of a greedy step's time at the small config)."""
  if not scan:
    outputs = []
    for i, layer in enumerate(stacked):
      x, cache = fn(layer, x, None if caches is None else caches[i], *shared)
      outputs.append(cache)
    return x, tuple(outputs)

  @nnx.scan(in_axes=(0, nnx.Carry, None if caches is None else 0) + (None,) * len(shared),
            out_axes=(nnx.Carry, 0), transform_metadata={nnx.PARTITION_NAME: "layers"})
  def run(layer, carry, cache, *args):
    return fn(layer, carry, cache, *args)

  return run(stacked, x, caches, *shared)
