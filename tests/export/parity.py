"""Helpers for the HF BLIP parity tests: non-trivial random weights on both sides, shared
inputs, and the outputs a user compares (ITC features, ITM logits, decoder logits, greedy
captions) computed by klip_jax and by transformers."""

from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
from flax import nnx, traverse_util

from klip_jax.data import prepare
from klip_jax.data.tokenizer import TokenIds
from klip_jax.model import decode
from klip_jax.model.klip import KLIP
from klip_jax.parallel import mesh as mesh_lib
from tests.workdir import saved_workdir

log = logging.getLogger(__name__)

# What a small vocabulary's special ids look like (the real ones come from the codec); the
# vocabulary size varies per test and is passed on its own.
TOKENS = TokenIds(pad=0, cls=4, enc=5, dec=2, mask=6, sep=3, separator=7, vocab_size=0)
FIRST_ORDINARY = 8


def perturb(params: dict, seed: int) -> dict:
  """Numpy copy of a nested parameter dict with random biases and LayerNorm scales, so that a
  wrong mapping cannot hide behind zero biases and unit scales."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    leaf = np.asarray(leaf, np.float32)
    if path[-1] == "scale":
      leaf = 1.0 + 0.2 * rng.standard_normal(leaf.shape, np.float32)
    elif path[-1] == "bias":
      leaf = 0.2 * rng.standard_normal(leaf.shape, np.float32)
    out[path] = leaf
  return traverse_util.unflatten_dict(out)


def perturb_torch(model: torch.nn.Module, seed: int) -> None:
  """The same for a transformers model: random biases and LayerNorm weights, and visible vision
  class/position embeddings (BLIP initialises them with std 1e-10)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or name.endswith(("class_embedding", "position_embedding")):
        p.copy_(0.2 * torch.randn(p.shape, generator=generator))
      elif "LayerNorm" in name or "layer_norm" in name or "post_layernorm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))


def random_params(config, vocab_size: int, seed: int) -> dict:
  """Random klip_jax parameters (a nested numpy dict): normal(0, init_std) tensors, perturbed
  biases and scales. Drawn with numpy from the abstract model, so nothing is compiled."""
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    model = nnx.eval_shape(lambda: KLIP(config.model, vocab_size, rngs=nnx.Rngs(params=0)))
  rng = np.random.default_rng(seed)
  std = config.model.text.init_std
  params = jax.tree.map(lambda a: std * rng.standard_normal(a.shape, np.float32),
                        nnx.state(model, nnx.Param).to_pure_dict())
  return perturb(params, seed)


def trained_workdir(config, workdir: str, seed: int, step: int) -> tuple[dict, TokenIds]:
  """A workdir as `klip train` leaves it, at `step`, holding `random_params(seed)` -> (those
  params, the codec's token ids)."""
  vocab_size = prepare.ensure(config, workdir).codec.vocab_size
  return saved_workdir(config, workdir, step, random_params(config, vocab_size, seed))


def klip_model(config, vocab_size: int, params: dict) -> tuple[KLIP, jax.sharding.Mesh]:
  """A KLIP model on one device holding `params` (a nested dict of arrays)."""
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    model = nnx.eval_shape(lambda: KLIP(config.model, vocab_size, rngs=nnx.Rngs(params=0)))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(model, state)
  return model, mesh


def inputs(config, vocab_size: int, tokens: TokenIds, seed: int, batch: int = 3) -> dict:
  """Images [B, H, W, 1] and [CLS]-first padded captions of different lengths."""
  rng = np.random.default_rng(seed)
  size, length = config.model.vision.image_size, 12
  ids = rng.integers(FIRST_ORDINARY, vocab_size, (batch, length)).astype(np.int32)
  lengths = np.linspace(length, length // 2, batch).astype(int)
  pad = np.arange(length)[None] < lengths[:, None]
  ids[np.arange(batch), lengths - 1] = tokens.sep
  ids = np.where(pad, ids, tokens.pad)
  ids[:, 0] = tokens.cls
  return {"images": rng.standard_normal((batch, size, size, 1)).astype(np.float32), "ids": ids, "pad": pad}


@functools.cache
def _compiled_outputs(config_json: str, vocab_size: int, tokens: TokenIds, gen_len: int):
  """(config, mesh, jitted params, images, ids, pad -> outputs), compiled once per model config."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    graph, abstract = nnx.split(nnx.eval_shape(lambda: KLIP(config.model, vocab_size, rngs=nnx.Rngs(0))))

  @jax.jit
  def run(params, images, ids, pad):
    state = jax.tree.map(lambda a: a, abstract)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graph, state)
    image_tokens, image_feat = model.encode_image(images)
    text_feat = model.encode_text(ids, pad)
    itm = model.itm_logits(ids.at[:, 0].set(tokens.enc), pad, image_tokens)
    logits = model.decoder_logits(ids.at[:, 0].set(tokens.dec), pad, image_tokens)
    greedy, _ = decode.generate(model, image_tokens, max_len=gen_len, dec_id=tokens.dec, sep_id=tokens.sep,
                                pad_id=tokens.pad)
    return {"image_feat": image_feat, "text_feat": text_feat, "cosine": image_feat @ text_feat.T,
            "itm_logits": itm, "decoder_logits": logits, "greedy": greedy}

  return config, mesh, run


def klip_outputs(config, vocab_size: int, params: dict, x: dict, tokens: TokenIds,
                 gen_len: int) -> dict:
  """ITC features, cosine matrix, ITM logits, decoder logits and greedy captions of klip_jax."""
  config, mesh, run = _compiled_outputs(config.to_json_best_effort(), vocab_size, tokens, gen_len)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    out = run(params, *(jnp.asarray(x[k]) for k in ("images", "ids", "pad")))
  return {k: np.asarray(v) for k, v in out.items()}


@torch.no_grad()
def hf_outputs(retrieval, captioning, x: dict, tokens: TokenIds, gen_len: int) -> dict:
  """The same outputs from transformers: a grey image replicated to RGB, NCHW."""
  pixels = torch.from_numpy(np.repeat(x["images"].transpose(0, 3, 1, 2), 3, axis=1))
  ids, mask = torch.from_numpy(x["ids"]).long(), torch.from_numpy(x["pad"]).long()
  itc = retrieval(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False)
  normalize = torch.nn.functional.normalize
  image_feat = normalize(retrieval.vision_proj(itc.last_hidden_state[:, 0]), dim=-1)
  text_feat = normalize(retrieval.text_proj(itc.question_embeds[:, 0]), dim=-1)
  enc_ids, dec_ids = ids.clone(), ids.clone()
  enc_ids[:, 0], dec_ids[:, 0] = tokens.enc, tokens.dec
  itm = retrieval(input_ids=enc_ids, pixel_values=pixels, attention_mask=mask).itm_score
  logits = captioning(pixel_values=pixels, input_ids=dec_ids, attention_mask=mask).logits
  greedy = captioning.generate(pixel_values=pixels, max_length=gen_len, num_beams=1, do_sample=False,
                               suppress_tokens=[tokens.pad, tokens.dec])
  greedy = torch.nn.functional.pad(greedy, (0, gen_len - greedy.shape[1]), value=tokens.pad)
  out = {"image_feat": image_feat, "text_feat": text_feat, "cosine": itc.itm_score, "itm_logits": itm,
         "decoder_logits": logits, "greedy": greedy}
  return {k: v.numpy() for k, v in out.items()}


def assert_parity(ours: dict, theirs: dict, label: str, atol: float = 1e-4) -> dict:
  """Floats equal within `atol`, greedy tokens identical; logs and returns the max abs diffs."""
  diffs = {k: float(np.abs(ours[k].astype(np.float64) - theirs[k]).max()) for k in ours if k != "greedy"}
  log.info("%s max abs differences: %s", label, {k: f"{v:.2e}" for k, v in diffs.items()})
  for k, v in diffs.items():
    assert v <= atol, f"{label}: {k} differs by {v}"
  np.testing.assert_array_equal(ours["greedy"], theirs["greedy"], err_msg=f"{label}: greedy captions")
  return diffs
