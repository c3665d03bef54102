"""klip_jax <-> Hugging Face BLIP: config translation and the tensor mapping.

Parameters travel as flat dicts. On the klip_jax side keys are "/"-joined parameter paths with
one entry per layer (scanned towers are unstacked, see `flatten`); on the HF side they are
state-dict names. Each `Entry` names one HF tensor, the klip_jax tensors it is made of and a
layout kind, and the same entries drive export and import so the two stay inverse.
Only layouts change here (transposes, q|k|v fusing, RGB <-> one channel, resampled position
tables); the numbers agree by construction because `blip_config` gives HF the same GELU,
LayerNorm epsilon and shapes as the klip_jax config.

BLIP's towers: BlipForImageTextRetrieval.text_encoder is the klip_jax text tower (self- and
cross-attention, FFN); BlipForConditionalGeneration.text_decoder is the decoder tower, which
with `share_decoder` is the same tower with each layer's `causal_attn` as its self-attention.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from klip_jax.data.tokenizer import TokenIds
from klip_jax.errors import ConfigError, ExportError
from klip_jax.model import vit

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[export]'"

# klip_jax approximate_gelu <-> HF hidden_act. "gelu_new" is the same tanh approximation.
_HIDDEN_ACT = {False: "gelu", True: "gelu_pytorch_tanh"}
_APPROXIMATE = {"gelu": False, "gelu_pytorch_tanh": True, "gelu_new": True}


def require() -> tuple[Any, Any, Any]:
  """(torch, transformers, safetensors), or an ExportError that says how to install them."""
  try:
    import safetensors
    import safetensors.numpy
    import safetensors.torch
    import torch
    import transformers
  except ImportError as e:
    raise ExportError(f"Hugging Face export/import needs the export extra ({e}): {INSTALL_HINT}") from None
  return torch, transformers, safetensors


def blip_config(model: ml_collections.ConfigDict, vocab_size: int, tokens: TokenIds,
                temperature: float | None = None):
  """The transformers.BlipConfig that computes what the klip_jax model config computes.

  Every field klip_jax has a value for is written from it, so no HF default contradicts the
  model: widths, epsilons, activations, the ITC width (`image_text_hidden_size`, and
  `projection_dim`, which only BlipModel reads), initialiser scales, no dropout, no label
  smoothing, and `logit_scale_init_value` = log(1 / temperature) (BlipModel's ITC logits are
  cosine * exp(logit_scale), ours cosine / temperature; the retrieval model returns the plain
  cosine). generate() starts with bos ([DEC]) and stops at sep ([SEP]); pad is [PAD].
  """
  _, transformers, _ = require()
  v, t = model.vision, model.text
  vision = {"hidden_size": v.width, "intermediate_size": v.mlp_dim, "num_hidden_layers": v.depth,
            "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
            "hidden_act": _HIDDEN_ACT[bool(v.approximate_gelu)], "layer_norm_eps": float(v.ln_eps),
            "projection_dim": model.embed_dim, "attention_dropout": 0.0, "initializer_range": float(v.init_std)}
  text = {"vocab_size": vocab_size, "hidden_size": t.width, "intermediate_size": t.mlp_dim,
          "num_hidden_layers": t.depth, "num_attention_heads": t.heads, "max_position_embeddings": t.max_len,
          "hidden_act": _HIDDEN_ACT[bool(t.approximate_gelu)], "layer_norm_eps": float(t.ln_eps),
          "bos_token_id": tokens.dec, "eos_token_id": tokens.sep, "sep_token_id": tokens.sep,
          "pad_token_id": tokens.pad, "projection_dim": model.embed_dim, "hidden_dropout_prob": 0.0,
          "attention_probs_dropout_prob": 0.0, "initializer_range": float(t.init_std), "label_smoothing": 0.0,
          "tie_word_embeddings": True,  # klip_jax's LM head reads the word embeddings
          "is_decoder": True}  # is_decoder: BLIP text layers get cross-attention
  temperature = model.temp_init if temperature is None else temperature
  return transformers.BlipConfig(vision_config=vision, text_config=text,
                                 image_text_hidden_size=model.embed_dim, projection_dim=model.embed_dim,
                                 logit_scale_init_value=math.log(1.0 / temperature), label_smoothing=0.0,
                                 initializer_range=float(t.init_std))


def generation_config(max_len: int, tokens: TokenIds):
  """klip_jax's caption decoding rule as a transformers.GenerationConfig: greedy from [DEC] to
  [SEP] (or `max_len` tokens, [DEC] included), never writing `TokenIds.never_generated`."""
  _, transformers, _ = require()
  return transformers.GenerationConfig(
      bos_token_id=tokens.dec, decoder_start_token_id=tokens.dec, eos_token_id=tokens.sep,
      pad_token_id=tokens.pad, max_length=max_len, num_beams=1, do_sample=False,
      suppress_tokens=list(tokens.never_generated()))


@dataclasses.dataclass
class Checkpoint:
  """An HF BLIP checkpoint: where it came from, its BlipConfig and its state dict (numpy).

  `vocab_mismatch` says why its vocabulary tensors (word embeddings, LM-head bias) are not rows
  of the run's tokenizer even where their row count matches (another tokenizer's pieces), so
  `from_hf` leaves them out; None when its tokenizer is the run's (or was not checked).
  """

  name: str
  config: Any
  tensors: Mapping[str, np.ndarray]
  vocab_mismatch: str | None = None

  def has_prefix(self, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in self.tensors)


def _approximate(act: str, where: str) -> bool:
  if act not in _APPROXIMATE:
    raise ConfigError(f"{where}: hidden_act={act!r} has no klip_jax equivalent; klip_jax supports "
                      f"{sorted(_APPROXIMATE)}.")
  return _APPROXIMATE[act]


def check_compatible(model: ml_collections.ConfigDict, checkpoint: Checkpoint) -> None:
  """ConfigError naming the klip_jax field and the checkpoint's value where they disagree.

  The image size may differ (position embeddings are interpolated) and the checkpoint may have
  more text positions than model.text.max_len (the first ones are kept).
  """
  v, t, source = model.vision, model.text, checkpoint.name
  hv, ht = checkpoint.config.vision_config, checkpoint.config.text_config
  fields = [
      ("model.vision.width", v.width, "vision_config.hidden_size", hv.hidden_size),
      ("model.vision.depth", v.depth, "vision_config.num_hidden_layers", hv.num_hidden_layers),
      ("model.vision.heads", v.heads, "vision_config.num_attention_heads", hv.num_attention_heads),
      ("model.vision.mlp_dim", v.mlp_dim, "vision_config.intermediate_size", hv.intermediate_size),
      ("model.vision.patch_size", v.patch_size, "vision_config.patch_size", hv.patch_size),
      ("model.vision.ln_eps", v.ln_eps, "vision_config.layer_norm_eps", hv.layer_norm_eps),
      ("model.vision.approximate_gelu", v.approximate_gelu, "vision_config.hidden_act",
       _approximate(hv.hidden_act, f"{source} vision_config")),
      ("model.text.width", t.width, "text_config.hidden_size", ht.hidden_size),
      ("model.text.depth", t.depth, "text_config.num_hidden_layers", ht.num_hidden_layers),
      ("model.text.heads", t.heads, "text_config.num_attention_heads", ht.num_attention_heads),
      ("model.text.mlp_dim", t.mlp_dim, "text_config.intermediate_size", ht.intermediate_size),
      ("model.text.ln_eps", t.ln_eps, "text_config.layer_norm_eps", ht.layer_norm_eps),
      ("model.text.approximate_gelu", t.approximate_gelu, "text_config.hidden_act",
       _approximate(ht.hidden_act, f"{source} text_config")),
  ]
  if "vision_proj.weight" in checkpoint.tensors:
    fields.append(("model.embed_dim", model.embed_dim, "image_text_hidden_size",
                   checkpoint.config.image_text_hidden_size))
  for field, ours, name, theirs in fields:
    same = math.isclose(ours, theirs, rel_tol=1e-6) if isinstance(ours, float) else ours == theirs
    if not same:
      shown = {"vision_config.hidden_act": hv.hidden_act, "text_config.hidden_act": ht.hidden_act}.get(name, theirs)
      raise ConfigError(f"config.{field}={ours} but {source} has {name}={shown!r}; set "
                        f"--config.{field}={theirs} (or import a checkpoint of this shape).")
  if ht.max_position_embeddings < t.max_len:
    raise ConfigError(f"config.model.text.max_len={t.max_len} exceeds {source}'s "
                      f"text_config.max_position_embeddings={ht.max_position_embeddings}; set "
                      f"--config.model.text.max_len={ht.max_position_embeddings} or lower.")


# ---------------------------------------------------------------------------------------------
# Flat parameter dicts.


def _stacks(model: ml_collections.ConfigDict) -> dict[tuple[str, str], bool]:
  """The layer stacks of the model and whether each is scanned (one leading "layers" axis)."""
  return {("vision", "blocks"): model.vision.scan_layers, ("text", "layers"): model.text.scan_layers,
          ("decoder", "layers"): model.text.scan_layers}


def _key(path: Sequence) -> str:
  return "/".join(str(p) for p in path)


def flatten(tree: Mapping, model: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """A nested klip_jax parameter dict (nnx pure dict) -> {"text/layers/0/fc1/kernel": array}."""
  stacks = _stacks(model)
  flat = {}
  for path, leaf in traverse_util.flatten_dict(tree).items():
    leaf = np.asarray(leaf)
    if stacks.get(path[:2]):
      for i, layer in enumerate(leaf):
        flat[_key(path[:2] + (i,) + path[2:])] = layer
    else:
      flat[_key(path)] = leaf
  return flat


def unflatten(flat: Mapping[str, np.ndarray], template: Mapping,
              model: ml_collections.ConfigDict) -> dict:
  """The inverse of `flatten`, shaped and typed like `template` (a nested parameter dict)."""
  stacks = _stacks(model)
  out = {}
  for path, leaf in traverse_util.flatten_dict(template).items():
    if stacks.get(path[:2]):
      value = np.stack([flat[_key(path[:2] + (i,) + path[2:])] for i in range(leaf.shape[0])])
    else:
      value = flat[_key(path)]
    out[path] = np.asarray(value, dtype=leaf.dtype)
  return traverse_util.unflatten_dict(out)


# ---------------------------------------------------------------------------------------------
# The mapping.


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor, the klip_jax tensors it is made of, and how (a key of _TO_HF/_FROM_HF)."""

  hf: str
  jax: tuple[str, ...]
  kind: str = "copy"


def _linear(hf: str, jax: str) -> list[Entry]:
  return [Entry(f"{hf}.weight", (f"{jax}/kernel",), "linear"), Entry(f"{hf}.bias", (f"{jax}/bias",))]


def _norm(hf: str, jax: str) -> list[Entry]:
  return [Entry(f"{hf}.weight", (f"{jax}/scale",)), Entry(f"{hf}.bias", (f"{jax}/bias",))]


def _vision_entries(v: ml_collections.ConfigDict) -> list[Entry]:
  hf = "vision_model."
  entries = [Entry(f"{hf}embeddings.class_embedding", ("vision/cls_token",)),
             Entry(f"{hf}embeddings.position_embedding", ("vision/pos_embed",), "vision_pos"),
             Entry(f"{hf}embeddings.patch_embedding.weight", ("vision/patch_embed/kernel",), "patch"),
             Entry(f"{hf}embeddings.patch_embedding.bias", ("vision/patch_embed/bias",)),
             *_norm(f"{hf}post_layernorm", "vision/norm")]
  for i in range(v.depth):
    h, j = f"{hf}encoder.layers.{i}.", f"vision/blocks/{i}/attn"
    # HF always fuses q|k|v; a split klip_jax tower is fused by concatenation.
    qkv = (f"{j}/qkv",) if v.fused_qkv else tuple(f"{j}/{n}" for n in ("query", "key", "value"))
    entries += [*_norm(f"{h}layer_norm1", f"vision/blocks/{i}/norm1"),
                Entry(f"{h}self_attn.qkv.weight", tuple(f"{p}/kernel" for p in qkv), "qkv_kernel"),
                Entry(f"{h}self_attn.qkv.bias", tuple(f"{p}/bias" for p in qkv), "qkv_bias"),
                *_linear(f"{h}self_attn.projection", f"{j}/out"),
                *_norm(f"{h}layer_norm2", f"vision/blocks/{i}/norm2"),
                *_linear(f"{h}mlp.fc1", f"vision/blocks/{i}/mlp/fc1"),
                *_linear(f"{h}mlp.fc2", f"vision/blocks/{i}/mlp/fc2")]
  return entries


def _attention_entries(hf: str, jax: str) -> list[Entry]:
  """BlipTextAttention at `hf` <-> a klip_jax SubLayer at `jax`."""
  return [*(e for n in ("query", "key", "value") for e in _linear(f"{hf}.self.{n}", f"{jax}/attn/{n}")),
          *_linear(f"{hf}.output.dense", f"{jax}/attn/out"), *_norm(f"{hf}.output.LayerNorm", f"{jax}/norm")]


def _text_entries(hf: str, tower: str, depth: int, self_attn: str) -> list[Entry]:
  """BlipTextModel at prefix `hf` <-> klip_jax tower `tower`, HF self-attention <- `self_attn`."""
  entries = [Entry(f"{hf}embeddings.word_embeddings.weight", (f"{tower}/word_embed/embedding",), "vocab"),
             Entry(f"{hf}embeddings.position_embeddings.weight", (f"{tower}/pos_embed/embedding",), "text_pos"),
             *_norm(f"{hf}embeddings.LayerNorm", f"{tower}/embed_norm")]
  for i in range(depth):
    h, j = f"{hf}encoder.layer.{i}.", f"{tower}/layers/{i}/"
    entries += [*_attention_entries(f"{h}attention", f"{j}{self_attn}"),
                *_attention_entries(f"{h}crossattention", f"{j}cross_attn"),
                *_linear(f"{h}intermediate.dense", f"{j}fc1"),
                *_linear(f"{h}output.dense", f"{j}fc2"), *_norm(f"{h}output.LayerNorm", f"{j}ffn_norm")]
  return entries


_LM_HEAD = "text_decoder.cls.predictions."


def _lm_head_entries(tower: str) -> list[Entry]:
  # cls.predictions.decoder.{weight,bias} are tied to the word embeddings and to `bias`.
  return [*_linear(f"{_LM_HEAD}transform.dense", f"{tower}/lm_head/transform"),
          *_norm(f"{_LM_HEAD}transform.LayerNorm", f"{tower}/lm_head/norm"),
          Entry(f"{_LM_HEAD}bias", (f"{tower}/lm_head/bias",), "vocab")]


def _head_entries() -> list[Entry]:
  return [*_linear("vision_proj", "vision_proj"), *_linear("text_proj", "text_proj"),
          *_linear("itm_head", "itm_head")]


def _decoder(model: ml_collections.ConfigDict) -> tuple[str, str]:
  """(klip_jax tower of the decoder, its sublayer that is HF's decoder self-attention)."""
  return ("text", "causal_attn") if model.share_decoder else ("decoder", "self_attn")


def retrieval_entries(model: ml_collections.ConfigDict) -> list[Entry]:
  """The tensors of a BlipForImageTextRetrieval."""
  return [*_vision_entries(model.vision),
          *_text_entries("text_encoder.", "text", model.text.depth, "self_attn"), *_head_entries()]


def captioning_entries(model: ml_collections.ConfigDict) -> list[Entry]:
  """The tensors of a BlipForConditionalGeneration (its tied LM-head tensors excepted)."""
  tower, self_attn = _decoder(model)
  return [*_vision_entries(model.vision),
          *_text_entries("text_decoder.bert.", tower, model.text.depth, self_attn),
          *_lm_head_entries(tower)]


def _qkv_kernel_to_hf(*kernels: np.ndarray) -> np.ndarray:
  # [in, 3, out] (fused) or three [in, out] (split) -> [3 * out, in], rows ordered q, k, v.
  return np.concatenate([k.reshape(k.shape[0], -1) for k in kernels], axis=1).T


def _patch_to_hf(kernel: np.ndarray) -> np.ndarray:
  # [p, p, 1, D] -> [D, 3, p, p] with a third of the kernel on each RGB channel, so a grey image
  # replicated to RGB gives the single-channel features.
  return np.repeat(kernel.transpose(3, 2, 0, 1), 3, axis=1) / 3.0


_TO_HF: dict[str, Callable[..., np.ndarray]] = {
    "copy": lambda x: x,
    "vocab": lambda x: x,
    "vision_pos": lambda x: x,
    "text_pos": lambda x: x,
    "linear": lambda x: x.T,
    "qkv_kernel": _qkv_kernel_to_hf,
    "qkv_bias": lambda *bs: np.concatenate([b.reshape(-1) for b in bs]),
    "patch": _patch_to_hf,
}


def to_hf(flat: Mapping[str, np.ndarray], entries: Sequence[Entry]) -> dict[str, np.ndarray]:
  """HF state dict (float32) of the klip_jax parameters `flat` for the model of `entries`."""
  return {e.hf: np.ascontiguousarray(_TO_HF[e.kind](*(np.asarray(flat[k], np.float32) for k in e.jax)),
                                     dtype=np.float32) for e in entries}


def _split_qkv(x: np.ndarray, shapes: Sequence[tuple]) -> list[np.ndarray]:
  # [3 * out, in] -> [in, 3 * out] (a bias [3 * out] is its own transpose), then per target.
  return [part.reshape(shape) for part, shape in zip(np.split(x.T, len(shapes), axis=-1), shapes)]


def _vision_pos_from_hf(x: np.ndarray, shapes: Sequence[tuple]) -> list[np.ndarray]:
  grid = round((shapes[0][1] - 1) ** 0.5)
  return [np.asarray(vit.interpolate_positions(jnp.asarray(x), grid), np.float32)]


_FROM_HF: dict[str, Callable[[np.ndarray, Sequence[tuple]], list[np.ndarray] | None]] = {
    "copy": lambda x, shapes: [x],
    # A checkpoint of another vocabulary (e.g. BERT wordpieces) keeps the fresh klip_jax rows.
    "vocab": lambda x, shapes: [x] if x.shape == shapes[0] else None,
    "vision_pos": _vision_pos_from_hf,
    "text_pos": lambda x, shapes: [x[:shapes[0][0]]],
    "linear": lambda x, shapes: [x.T],
    "qkv_kernel": _split_qkv,
    "qkv_bias": _split_qkv,
    # RGB -> one channel: summing over channels gives a grey image replicated to RGB's features.
    "patch": lambda x, shapes: [x.sum(axis=1, keepdims=True).transpose(2, 3, 1, 0)],
}


def _role(sources: Sequence[Checkpoint], prefixes: Sequence[str]) -> tuple[Checkpoint, str]:
  """The first checkpoint (and its BlipTextModel prefix) with a tower at one of `prefixes`."""
  for prefix in prefixes:
    for source in sources:
      if source.has_prefix(prefix):
        return source, prefix
  raise ExportError(f"no BLIP text tower (text_encoder.* or text_decoder.*) in "
                    f"{', '.join(s.name for s in sources)}.")


def _holding(sources: Sequence[Checkpoint], key: str) -> Checkpoint | None:
  return next((s for s in sources if key in s.tensors), None)


def import_plan(model: ml_collections.ConfigDict,
                sources: Sequence[Checkpoint]) -> list[tuple[Checkpoint | None, Entry]]:
  """Which checkpoint fills which klip_jax tensors.

  The text encoder side (embeddings, bidirectional self-attention, cross-attention, FFN) comes
  from a retrieval checkpoint's text_encoder, the decoder's causal self-attention (and, without
  `share_decoder`, the whole decoder) and the LM head from a captioning checkpoint's
  text_decoder; with only one of them, it fills both roles as BLIP's pretraining init does.
  The vision tower comes whole from one checkpoint (the encoder's first).
  """
  encoder, encoder_hf = _role(sources, ("text_encoder.", "text_decoder.bert."))
  decoder, decoder_hf = _role(sources, ("text_decoder.bert.", "text_encoder."))
  depth = model.text.depth
  vision = _holding([encoder, decoder, *sources], "vision_model.embeddings.patch_embedding.weight")
  plan = [(vision, e) for e in _vision_entries(model.vision)]
  plan += [(encoder, e) for e in _text_entries(encoder_hf, "text", depth, "self_attn")]
  tower, _ = _decoder(model)
  if model.share_decoder:
    plan += [(decoder, e) for i in range(depth)
             for e in _attention_entries(f"{decoder_hf}encoder.layer.{i}.attention",
                                         f"text/layers/{i}/causal_attn")]
  else:
    plan += [(decoder, e) for e in _text_entries(decoder_hf, "decoder", depth, "self_attn")]
  plan += [(_holding(sources, f"{_LM_HEAD}bias"), e) for e in _lm_head_entries(tower)]
  plan += [(_holding(sources, "itm_head.weight"), e) for e in _head_entries()]
  return plan


def _adaptation(kind: str, hf_shape: tuple, shape: tuple) -> str | None:
  """A note on how a tensor was changed to fit, for the import report."""
  if kind == "patch":
    return f"patch embedding: {hf_shape[1]}-channel kernel summed to one channel"
  if kind == "vision_pos" and hf_shape != shape:
    old, new = (round((s[1] - 1) ** 0.5) for s in (hf_shape, shape))
    return f"vision position embeddings: bicubic {old}x{old} -> {new}x{new} patches"
  if kind == "text_pos" and hf_shape != shape:
    return f"text position embeddings: first {shape[0]} of {hf_shape[0]} kept"
  return None


@dataclasses.dataclass
class ImportReport:
  """What an import took from the checkpoints, what it left fresh and why, and what it adapted."""

  imported: list[str]  # klip_jax tensors taken from a checkpoint
  not_imported: dict[str, str]  # klip_jax tensor -> why it keeps its fresh initialisation
  adapted: list[str]  # how tensors were changed to fit (interpolation, channels, truncation)


def from_hf(plan: Sequence[tuple[Checkpoint | None, Entry]],
            template: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], ImportReport]:
  """klip_jax flat parameters: `template` (fresh values) with what `plan` can fill replaced."""
  flat = dict(template)
  report = ImportReport([], {}, [])
  for source, entry in plan:
    if source is None or entry.hf not in source.tensors:
      for k in entry.jax:
        report.not_imported[k] = "not in the checkpoint"
      continue
    x = np.asarray(source.tensors[entry.hf], np.float32)
    shapes = [template[k].shape for k in entry.jax]
    try:
      values = _FROM_HF[entry.kind](x, shapes)
      fits = values is None or [v.shape for v in values] == shapes
    except ValueError:  # a reshape that cannot fit
      fits = False
    if not fits:
      raise ConfigError(f"{source.name}: {entry.hf} has shape {x.shape}, which does not fit klip_jax's "
                        f"{', '.join(entry.jax)} {shapes}; check config.model against the checkpoint's "
                        "config.json.")
    if values is None or (entry.kind == "vocab" and source.vocab_mismatch):
      for k in entry.jax:
        report.not_imported[k] = source.vocab_mismatch if values is not None else (
            f"vocabulary differs: {source.name} has {x.shape[0]} tokens, the tokenizer {template[k].shape[0]}")
      continue
    flat.update(zip(entry.jax, values))
    report.imported.extend(entry.jax)
    note = _adaptation(entry.kind, x.shape, shapes[0])
    if note and note not in report.adapted:
      report.adapted.append(note)
  done = set(report.imported) | set(report.not_imported)
  for k in template:
    if k not in done:
      report.not_imported[k] = "no BLIP counterpart"
  for k, why in report.not_imported.items():
    log.info("not imported (fresh initialisation kept): %s: %s", k, why)
  return flat, report
