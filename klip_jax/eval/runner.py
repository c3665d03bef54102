"""A model's evaluation-time calls over numpy arrays of any length.

Every call is one jitted pure function of (params, batch) at a fixed batch size (so it
compiles once): inputs are cut into batches, the last one padded with copies of its first row,
sharded over the mesh's batch axes, and the outputs are gathered back to the host and trimmed.
In a multi-process run every host holds the whole evaluation arrays, makes the same calls,
and gets all outputs back (`parallel.hosts`), so every host computes the same metrics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klip_jax.data import pipeline
from klip_jax.data.tokenizer import TokenIds
from klip_jax.model import decode
from klip_jax.parallel import hosts
from klip_jax.parallel import mesh as mesh_lib

_PAIRS_PER_CALL = 4096  # pairs whose image tokens are gathered on the host at a time


class ModelRunner:
  """Batched image/text encoders, ITM, decoder likelihoods and caption generation of one
  parameter set (a trained checkpoint, or a random initialisation as the baseline)."""

  def __init__(self, graph: nnx.GraphDef, params, tokens: TokenIds, mesh: jax.sharding.Mesh,
               rules, batch_size: int):
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    self.batch_size = -(-batch_size // data_parallel) * data_parallel
    self.graph, self.params, self.tokens, self.mesh, self.rules = graph, params, tokens, mesh, rules
    self._compiled: dict = {}

  def with_params(self, params) -> ModelRunner:
    """The same calls on other parameters of the same model (e.g. fine-tuned ones)."""
    other = ModelRunner(self.graph, params, self.tokens, self.mesh, self.rules, self.batch_size)
    other._compiled = self._compiled  # same graph and shapes: reuse the compiled calls
    return other

  def cached(self, name: str, make: Callable[[], Callable]) -> Callable:
    """The compiled callable `name`, built by make() on first use, shared by with_params copies
    (so a periodic evaluation compiles each call once per run, not once per evaluation)."""
    if name not in self._compiled:
      self._compiled[name] = make()
    return self._compiled[name]

  def jitted(self, name: str, make: Callable[[], Callable]) -> Callable:
    """jax.jit(make()) as `cached` keeps it."""
    return self.cached(name, lambda: jax.jit(make()))

  def _call(self, name: str, fn: Callable, *arrays: np.ndarray):
    """fn(model, *batch) over `arrays` in batches; returns numpy outputs of len(arrays[0])."""
    graph = self.graph
    step = self.jitted(name, lambda: lambda params, *xs: fn(nnx.merge(graph, params), *xs))
    n, b = len(arrays[0]), self.batch_size
    outputs = []
    with mesh_lib.logical_context(self.mesh, self.rules):
      for start in range(0, n, b):
        chunk = [a[start:start + b] for a in arrays]
        rows = len(chunk[0])
        chunk = [pipeline.pad_rows(c, b) for c in chunk]
        batch = hosts.from_host(chunk, mesh_lib.batch_sharding(self.mesh))
        out = hosts.fetch(step(self.params, *batch))
        outputs.append(jax.tree.map(lambda x, rows=rows: x[:rows], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)

  def encode_images(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, H, W, 1] -> (tokens [N, 1 + P, D] in fp32, normalised ITC features [N, E])."""
    return self._call("image", lambda m, x: jax.tree.map(
        lambda y: y.astype(jnp.float32), m.encode_image(x)), images)

  def encode_texts(self, ids: np.ndarray) -> np.ndarray:
    """[N, L] captions ([CLS] first) -> normalised ITC features [N, E]."""
    pad = self.tokens.pad
    return self._call("text", lambda m, x: m.encode_text(x, x != pad), ids)

  def _pairs(self, name: str, fn: Callable, image_tokens: np.ndarray, ids: np.ndarray,
             rows: np.ndarray | None):
    """fn over pairs (image_tokens[rows[i]], ids[i]) (rows default: i). The pairs' image tokens
    are gathered a slice at a time: all of them at once would not fit host memory at base size."""
    if rows is None:
      return self._call(name, fn, image_tokens, ids)
    return np.concatenate([self._call(name, fn, image_tokens[rows[s:s + _PAIRS_PER_CALL]],
                                      ids[s:s + _PAIRS_PER_CALL])
                           for s in range(0, len(rows), _PAIRS_PER_CALL)])

  def itm_logits(self, image_tokens: np.ndarray, ids: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Match/no-match logits [N, 2] of the pairs (image rows[i], ids[i]); ids start with [CLS]."""
    pad, enc = self.tokens.pad, self.tokens.enc

    def fn(m, image, x):
      return m.itm_logits(x.at[:, 0].set(enc), x != pad, image.astype(m.vision.dtype))
    return self._pairs("itm", fn, image_tokens, ids, rows)

  def token_logprobs(self, image_tokens: np.ndarray, ids: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """log p(ids[:, t] | image rows[i], ids[:, :t]) for t >= 1 under the causal decoder
    ([N, L - 1]); ids start with any special token (replaced by [DEC]); padding gives 0."""
    pad, dec = self.tokens.pad, self.tokens.dec

    def fn(m, image, x):
      logits = m.decoder_logits(x.at[:, 0].set(dec), x != pad, image.astype(m.vision.dtype))
      logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
      picked = jnp.take_along_axis(logp, x[:, 1:, None], axis=-1)[..., 0]
      return jnp.where(x[:, 1:] != pad, picked, 0.0)
    return self._pairs("logprobs", fn, image_tokens, ids, rows)

  def generate(self, image_tokens: np.ndarray, *, max_len: int, beam_size: int,
               length_penalty: float = 1.0) -> np.ndarray:
    """Generated caption ids [N, max_len] ([DEC] first, [SEP] closes, padding after)."""
    t = self.tokens
    fn = functools.partial(
        _generate, max_len=max_len, beam_size=beam_size, length_penalty=length_penalty,
        dec_id=t.dec, sep_id=t.sep, pad_id=t.pad,
        banned_ids=t.never_generated())
    return self._call(f"generate_{beam_size}_{max_len}", fn, image_tokens)


def _generate(model, image_tokens, **kwargs):
  return decode.generate(model, image_tokens.astype(model.vision.dtype), **kwargs)[0]
