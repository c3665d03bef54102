"""`klip export` and `klip import-hf`: whole-workdir Hugging Face BLIP export and import.

Export writes OUT/retrieval (BlipForImageTextRetrieval: vision tower, text encoder, ITC
projections, ITM head) and OUT/captioning (BlipForConditionalGeneration: vision tower, text
decoder, LM head; the caption fine-tune when the workdir has one of the exported step), each
with model.safetensors, config.json, the sentencepiece tokenizer.model and a README.md with the
tokenisation recipe, captioning/ also with generation_config.json (our decoding rule), and
OUT/README.md, the model card (export/card.py). Import initialises a workdir from HF BLIP weights:
it writes WORKDIR/init_params, which `klip train` starts from when it has no checkpoint yet, and
takes an export's tokenizer.model as WORKDIR/tokenizer.model (the vocabulary its embeddings are of).
Both write into a temporary folder and rename it into place, so a failure leaves nothing
half-written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import sentencepiece as spm
from flax import nnx

from klip_jax import config as config_lib
from klip_jax import io
from klip_jax.data import builder, prepare
from klip_jax.data.tokenizer import TextCodec, TokenIds
from klip_jax.errors import ExportError, TokenizerError
from klip_jax.export import card, hf, processor
from klip_jax.parallel import hosts
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import checkpoint
from klip_jax.train import state as state_lib

log = logging.getLogger(__name__)

_MODELS = {"retrieval": ("BlipForImageTextRetrieval", hf.retrieval_entries),
           "captioning": ("BlipForConditionalGeneration", hf.captioning_entries)}
_EXPORT_NAMES = {*_MODELS, "README.md", *processor.TOP_LEVEL}  # what an export's top level holds
# The key of each exported config.json that says where its weights came from; only an export
# writes it, so it tells an earlier export (which --out may replace) from a user's folder.
EXPORT_MARKER = "klip_jax"
SP_MODEL = "tokenizer.model"  # the sentencepiece model an export writes into each model folder


def _readme(name: str, config: ml_collections.ConfigDict, codec, tokens: TokenIds,
            step: int, temperature: float, db_stats: tuple[float, float] | None, captioner: dict,
            transformers_version: str, results: dict | None) -> str:
  special = sorted(codec.special_ids)
  if db_stats is None:
    pixels = "DB_MEAN, DB_STD = ...  # the training set's dB statistics (builder metadata)"
  else:
    pixels = f"DB_MEAN, DB_STD = {db_stats[0]:.6f}, {db_stats[1]:.6f}  # the training set's dB statistics"
  size = config.model.vision.image_size
  usage = {
      "retrieval": f"""amplitude = ...  # a {size}x{size} SAR chip: uint16, or float32 amplitude
model = BlipForImageTextRetrieval.from_pretrained("{name}")
ids, mask = tokenize(["a caption"])  # [CLS] first: unimodal text for ITC
out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(amplitude), use_itm_head=False)
cosine = out.itm_score  # [images, texts]; contrastive logits = cosine / {temperature:.6f}
ids[:, 0] = ENC  # [ENC] first: image-grounded text for ITM
match = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(amplitude)).itm_score.softmax(-1)[:, 1]""",
      "captioning": f"""amplitude = ...  # a {size}x{size} SAR chip: uint16, or float32 amplitude
# trust_remote_code runs custom_generate/generate.py (3 lines): it hands generation_config.json to
# BLIP's text decoder, which transformers {transformers_version} does not do by itself. Without it, add
# `model.text_decoder.generation_config = model.generation_config` after loading.
model = BlipForConditionalGeneration.from_pretrained("{name}", trust_remote_code=True)
out = model.generate(pixel_values=pixels(amplitude))  # greedy from [DEC] to [SEP], at most MAX_LEN tokens
caption = sp.decode([i for i in out[0].tolist() if i not in SPECIAL])"""}[name]
  what = {"retrieval": f"""ITC similarities (cosine; the contrastive logits are cosine / {temperature:.6f}, the
trained temperature, which config.json holds as logit_scale_init_value = log(1 / temperature)) and
ITM match probabilities.""",
          "captioning": f"""Captioning: {captioner["note"]}. generation_config.json holds
klip_jax's decoding rule: greedy, starting with [DEC], ending at [SEP], at most {config.data.max_len} tokens,
never writing {", ".join(f"{n}={i}" for n, i in _never_generated(tokens))}."""}[name]
  readme = f"""{card.front_matter(name, results)}
# klip_jax export: {_MODELS[name][0]}

Exported from a klip_jax checkpoint at step {step}. {what}

The model reads single-channel SAR: give it
the standardised dB image replicated to 3 channels (the patch embedding holds a third of the
single-channel kernel per channel), {size}x{size} pixels. Text uses the sentencepiece model in
`tokenizer.model`, not a BERT tokenizer: [PAD]={tokens.pad} [DEC]={tokens.dec} (decoder start, bos)
[SEP]={tokens.sep} (end, eos) [CLS]={tokens.cls} (unimodal text) [ENC]={tokens.enc} (image-grounded text).

```python
import numpy as np
import sentencepiece as spm
import torch
from transformers import {_MODELS[name][0]}

sp = spm.SentencePieceProcessor(model_file="{name}/tokenizer.model")
PAD, DEC, SEP, CLS, ENC = {tokens.pad}, {tokens.dec}, {tokens.sep}, {tokens.cls}, {tokens.enc}
SPECIAL = {set(special)}
MAX_LEN = {config.data.max_len}
{pixels}


def tokenize(captions, first=CLS):
  rows = [[first] + sp.encode(c)[:MAX_LEN - 2] + [SEP] for c in captions]
  ids = torch.full((len(rows), max(map(len, rows))), PAD)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = torch.tensor(row)
  return ids, (ids != PAD).long()


def pixels(amplitude):  # SAR amplitude [H, W] as klip ingested it -> [1, 3, H, W]
  # uint16 digital numbers: zeros count as 1; float amplitude: floored at -100 dB, NaN = no data
  floor = 1.0 if np.issubdtype(amplitude.dtype, np.integer) else 1e-5
  db = 20 * np.log10(np.maximum(amplitude.astype(np.float32), floor))
  grey = torch.from_numpy(np.nan_to_num((db - DB_MEAN) / DB_STD))
  return grey[None, None].expand(1, 3, -1, -1)


{usage}
```
"""
  return readme + "\n" + processor.readme_section(name)  # the processor, tokenizer and example


# Hands the folder's generation_config.json to BLIP's text decoder: BlipForConditionalGeneration
# .generate() delegates to text_decoder.generate(), whose generation config transformers builds
# from text_config (generation fields stripped) and never loads from the folder.
_CUSTOM_GENERATE = '''"""klip_jax: generate() with this folder's generation_config.json (klip_jax's decoding rule)."""


def generate(model, *args, **kwargs):
  model.text_decoder.generation_config = model.generation_config
  return type(model).generate(model, *args, **kwargs)
'''


def _never_generated(tokens: TokenIds) -> list[tuple[str, int]]:
  names = {tokens.pad: "PAD", tokens.dec: "DEC", tokens.cls: "CLS", tokens.enc: "ENC", tokens.mask: "MASK"}
  return [(names[i], i) for i in tokens.never_generated()]


def _captioner(choice: str, workdir: str, step: int) -> dict:
  """Which decoder OUT/captioning holds: {"source": "finetuned" | "pretrain", "note", "finetune"}.

  auto: the caption fine-tune when one was made from the exported step, else the pretraining
  decoder with a warning; finetuned: that fine-tune or an ExportError; pretrain: the decoder as
  pretrained."""
  meta = checkpoint.caption_finetune_meta(workdir)
  fix = f"run `klip finetune caption --workdir {workdir}`"
  if meta is not None and meta["source_step"] != step:
    problem = (f"{workdir}/caption_finetune was made from checkpoint step {meta['source_step']}, not the exported "
               f"step {step}; {fix} --rebuild (or export --step {meta['source_step']})")
  elif meta is None:
    problem = f"{workdir} has no caption fine-tune; {fix}"
  else:
    problem = None
  if choice == "finetuned" and problem:
    raise ExportError(f"--captioner finetuned: {problem}.")
  if choice == "pretrain" or problem:
    why = "--captioner pretrain" if choice == "pretrain" else "no usable caption fine-tune"
    note = (f"the pretraining decoder ({why}): it was trained only to reconstruct masked keywords, so it does "
            "not write fluent captions (it rarely emits [SEP] and repeats to the length limit)")
    if choice == "auto":
      note = f"{note}; {problem} to export the fine-tuned captioner"
      log.warning("captioning/ holds %s", note)
    return {"source": "pretrain", "note": note, "finetune": None}
  m = meta["metrics"]
  return {"source": "finetuned", "finetune": meta,
          "note": (f"the caption fine-tune of step {step} (klip finetune caption: {meta['steps']} steps of caption "
                   f"language modelling, lr {meta['lr']:g}; test split greedy BLEU-4 {m['greedy_bleu4']:.3f}, "
                   f"CIDEr {m['greedy_cider']:.3f} on {m['num_images']} chips)")}


def _is_earlier_export(target) -> bool:
  """Whether `target` is a folder a klip export wrote: only export names at its top level and a
  retrieval/config.json carrying EXPORT_MARKER. The names alone are not enough: a user's project
  folder holding just its own README.md has them too."""
  names = {p.name for p in target.iterdir()}
  config = target / "retrieval" / "config.json"
  if not names <= _EXPORT_NAMES or not config.is_file():
    return False
  try:
    return EXPORT_MARKER in io.read_json(config)
  except (ValueError, TypeError):  # not JSON, or JSON that is not an object: not ours
    return False


def _check_out(out: str, target) -> None:
  """Refuse an --out the export would destroy: it replaces `target` whole, which is right only
  for nothing, an empty folder or an earlier export."""
  if not target.exists():
    return
  if not target.is_dir():
    raise ExportError(f"--out {out} is a file, not a folder; choose a new or empty --out.")
  if any(target.iterdir()) and not _is_earlier_export(target):
    raise ExportError(f"--out {out} is not empty and is not an earlier export (which holds retrieval/config.json "
                      f"with a {EXPORT_MARKER!r} entry), so exporting would delete what it holds; choose a new or "
                      "empty --out, or remove its contents yourself.")


def export_workdir(workdir: str, out: str, step: int | None = None,
                   config: ml_collections.ConfigDict | None = None, captioner: str = "auto") -> dict:
  """Export a workdir's checkpoint (default: the latest) as HF BLIP retrieval and captioning
  models under `out`, with a model card; returns what was written.

  `config` defaults to the run's workdir/config.json. `captioner` picks what captioning/ holds
  (`_captioner`). `out` must be new, empty or an earlier export (`_is_earlier_export`; it is replaced); it may be on
  gs:// (written locally, then uploaded: safetensors and save_pretrained write local files only).
  """
  _, transformers, safetensors = hf.require()
  target = io.resolve(out)
  _check_out(out, target)
  config = config_lib.load_saved(str(io.path(workdir) / "config.json")) if config is None else config
  data = prepare.locate(config, workdir)
  mesh = mesh_lib.from_config(config.mesh)
  _, state = checkpoint.restore(config, workdir, data.codec.vocab_size, mesh, step)
  flat = hf.flatten(hosts.fetch(state.params.to_pure_dict()), config.model)
  chosen = _captioner(captioner, workdir, int(state.step))
  caption_flat = flat
  if chosen["source"] == "finetuned":
    tuned = checkpoint.restore_caption_finetune(config, workdir, data.codec.vocab_size, mesh)
    caption_flat = hf.flatten(hosts.fetch(tuned.to_pure_dict()), config.model)
  tokens = TokenIds.from_codec(data.codec)
  stats = builder.metadata(data.data_dir)
  db_stats = (stats["db_mean"], stats["db_std"]) if "db_mean" in stats else None
  temperature = float(np.clip(flat["temp"], *config.model.temp_range))
  models = {"retrieval": hf.to_hf(flat, hf.retrieval_entries(config.model)),
            "captioning": hf.to_hf(caption_flat, hf.captioning_entries(config.model))}
  # What every process returns; every process restored and gathered the parameters, one writes.
  written = {"step": int(state.step), "captioner": chosen,
             **{name: {"path": str(target / name), "tensors": len(t)} for name, t in models.items()}}
  if not hosts.is_writer():
    return written
  facts = card.Facts(workdir=workdir, step=written["step"], config=config, tokens=tokens, temperature=temperature,
                     db_stats=db_stats, dataset=stats, captioner=chosen,
                     results=io.read_json(io.path(workdir) / "eval" / "results.json")
                     if io.exists(io.path(workdir) / "eval" / "results.json") else None)
  with io.local_atomic_path(target, folder=True) as tmp:
    for name, (architecture, _) in _MODELS.items():
      folder = os.fspath(tmp / name)
      os.makedirs(folder)
      safetensors.numpy.save_file(models[name], os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
      blip = hf.blip_config(config.model, data.codec.vocab_size, tokens, temperature)
      blip.architectures = [architecture]
      # Where the weights came from, for whoever loads the folder without its README.
      # The key is EXPORT_MARKER: a later export recognises this one by it (`_is_earlier_export`).
      blip.klip_jax = {"step": written["step"], "temperature": temperature,
                       **({"captioner": chosen["source"]} if name == "captioning" else {})}
      blip.save_pretrained(folder)
      if name == "captioning":
        hf.generation_config(config.data.max_len, tokens).save_pretrained(folder)
        (tmp / name / "custom_generate").mkdir()
        (tmp / name / "custom_generate" / "generate.py").write_text(_CUSTOM_GENERATE)
      (tmp / name / "tokenizer.model").write_bytes(data.codec.sp.serialized_model_proto())
      (tmp / name / "README.md").write_text(
          _readme(name, config, data.codec, tokens, written["step"], temperature, db_stats, chosen,
                  transformers.__version__, facts.results))
    processor.write(tmp, tuple(_MODELS), data.codec, config.data.max_len, config.model.vision.image_size,
                    data.data_dir, db_stats)
    (tmp / "README.md").write_text(card.model_card(facts))
  log.info("exported step %d of %s to %s (captioning: %s)", written["step"], workdir, target, chosen["source"])
  return written


def _read_tensors(folder: str) -> dict[str, np.ndarray]:
  torch, _, safetensors = hf.require()
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(folder, "model.safetensors")):
    files = ["model.safetensors"]
  elif os.path.exists(os.path.join(folder, "pytorch_model.bin")):
    files = []
  else:
    raise ExportError(f"{folder} holds no model.safetensors(.index.json) or pytorch_model.bin.")
  state = {}
  for name in files:
    state.update(safetensors.torch.load_file(os.path.join(folder, name)))
  if not files:
    state = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


def _read_checkpoint(folder: str) -> hf.Checkpoint:
  _, transformers, _ = hf.require()
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise ExportError(f"{folder} has no config.json; give a folder written by save_pretrained "
                      "(or one with retrieval/ and captioning/ such folders).")
  with open(path) as f:
    model_type = json.load(f).get("model_type")
  if model_type != "blip":
    raise ExportError(f"{folder} holds a {model_type!r} model, not a BLIP (model_type 'blip') one.")
  return hf.Checkpoint(folder, transformers.BlipConfig.from_pretrained(folder), _read_tensors(folder))


@dataclasses.dataclass(frozen=True)
class _Vocabulary:
  """The tokenizer an HF folder ships, which gives its word embeddings' rows their meaning:
  its pieces in id order (None: the folder ships none), the file they were read from, and the
  serialized sentencepiece model when the folder holds one (a klip export does)."""

  source: str
  pieces: tuple[str | None, ...] | None
  model: bytes | None = None


def _read_vocabulary(folder: str) -> _Vocabulary:
  """The folder's tokenizer: klip's sentencepiece tokenizer.model first, else the pieces of a
  transformers tokenizer.json or a BERT vocab.txt (a Salesforce BLIP checkpoint's)."""
  path = os.path.join(folder, SP_MODEL)
  if os.path.isfile(path):
    with open(path, "rb") as f:
      model = f.read()
    try:
      sp = spm.SentencePieceProcessor(model_proto=model)
    except RuntimeError:  # not a sentencepiece model: no pieces to compare, nothing to adopt
      return _Vocabulary(path, None)
    return _Vocabulary(path, tuple(sp.id_to_piece(i) for i in range(sp.get_piece_size())), model)
  path = os.path.join(folder, "tokenizer.json")
  if os.path.isfile(path):
    with open(path) as f:
      spec = json.load(f)
    vocab = (spec.get("model") or {}).get("vocab") or {}
    ids = dict(vocab.items()) if isinstance(vocab, dict) else {row[0]: i for i, row in enumerate(vocab)}
    ids.update({t["content"]: t["id"] for t in spec.get("added_tokens", ())})
    pieces = [None] * (max(ids.values(), default=-1) + 1)
    for piece, i in ids.items():
      pieces[i] = piece
    return _Vocabulary(path, tuple(pieces))
  path = os.path.join(folder, "vocab.txt")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return _Vocabulary(path, tuple(line.rstrip("\n") for line in f))
  return _Vocabulary(folder, None)


def _vocab_mismatch(vocabulary: _Vocabulary, codec: TextCodec, tokenizer: str) -> str | None:
  """Why the checkpoint's vocabulary tensors (word embeddings, LM-head bias) are not rows of
  the run's tokenizer `codec` (read from `tokenizer`), or None when its pieces are the same
  ones in the same order. Equal sizes prove nothing: two sentencepiece models trained on other
  captions have the same piece count and give most ids another piece."""
  ours = tuple(codec.sp.id_to_piece(i) for i in range(codec.vocab_size))
  if vocabulary.pieces is None:
    return (f"{vocabulary.source} ships no tokenizer ({SP_MODEL}, tokenizer.json or vocab.txt) that "
            f"says which piece each of its embedding rows is, so they cannot be matched to {tokenizer}")
  if vocabulary.pieces == ours:
    return None
  same = sum(a == b for a, b in zip(vocabulary.pieces, ours))
  return (f"tokenizer differs: {vocabulary.source} has {len(vocabulary.pieces)} pieces, {tokenizer} "
          f"{len(ours)}, and only {same} ids are the same piece in both")


def _adopt_tokenizer(config: ml_collections.ConfigDict, workdir: str, vocabularies: list[_Vocabulary]) -> None:
  """Make the sentencepiece model the HF folder ships (a klip export's) the run's tokenizer,
  WORKDIR/tokenizer.model, so the imported word embeddings and LM head keep meaning the pieces
  they were trained on instead of a fresh tokenizer's. A tokenizer the user named
  (config.data.tokenizer) or the workdir already has is kept and compared instead
  (`_vocab_mismatch`); so is the fresh one trained when the folder ships no klip tokenizer (a
  Salesforce BLIP checkpoint's BERT vocabulary) or its folders ship different ones."""
  target = io.path(workdir) / SP_MODEL
  models = {v.model for v in vocabularies if v.model is not None}
  if config.data.tokenizer or io.exists(target) or len(models) != 1:
    return
  model = models.pop()
  try:
    TextCodec(model, config.data.max_len)
  except TokenizerError as e:  # a sentencepiece model without klip's special pieces
    log.warning("not using %s as the run's tokenizer (%s); training one instead", vocabularies[0].source, e)
    return
  io.write_bytes(target, model)
  log.info("the run's tokenizer is %s's sentencepiece model, copied to %s", vocabularies[0].source, target)


def import_hf(hf_dir: str, config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Initialise `workdir` from HF BLIP weights: writes workdir/init_params (and config.json),
  which `klip train` starts from; returns what was and was not imported.

  `hf_dir` is one save_pretrained folder (retrieval or captioning) or a folder holding
  retrieval/ and captioning/ ones (as `export_workdir` writes); see hf.import_plan for which
  tensors come from where. A gs:// `hf_dir` is copied to a local folder first (transformers and
  safetensors read local files only). The sentencepiece model a klip export ships becomes the
  run's tokenizer (`_adopt_tokenizer`); the word embeddings and LM-head bias are imported only
  when the folder's tokenizer has the run's tokenizer's pieces (`_vocab_mismatch`), since equal
  row counts alone would give most token ids another piece's embedding.
  """
  hf.require()
  path = checkpoint.init_params_path(workdir)
  if io.exists(path):  # checked before any work: orbax would refuse only when saving, at the end
    raise ExportError(f"{path} already exists: {workdir} was already initialised by klip import-hf. Import "
                      f"into a new --workdir, or remove {path} to import again.")
  with io.local_copy(hf_dir) as local:
    folders = [str(local / n) for n in _MODELS if (local / n).is_dir()] or [str(local)]
    sources = [_read_checkpoint(folder) for folder in folders]
    vocabularies = [_read_vocabulary(folder) for folder in folders]
  for source in sources:
    hf.check_compatible(config.model, source)
  config_lib.validate(config)
  _adopt_tokenizer(config, workdir, vocabularies)
  data = prepare.ensure(config, workdir)  # the tokenizer fixes the vocabulary the run will use
  for source, vocabulary in zip(sources, vocabularies):
    source.vocab_mismatch = _vocab_mismatch(vocabulary, data.codec, data.tokenizer)
  mesh = mesh_lib.from_config(config.mesh)
  checkpoints = checkpoint.manager(workdir, config)
  steps = sorted(checkpoints.all_steps())
  checkpoints.close()
  if steps:
    raise ExportError(f"{workdir} already has checkpoints (steps {steps}), which klip train would "
                      "resume from; import into a new --workdir.")
  tx, _ = state_lib.make_optimizer(config.optim, config.train.steps)
  _, state, shardings = state_lib.create(config, data.codec.vocab_size, tx, mesh)
  fresh = hosts.fetch(state.params.to_pure_dict())
  flat, report = hf.from_hf(hf.import_plan(config.model, sources), hf.flatten(fresh, config.model))
  values = jax.tree.map(hosts.from_host, hf.unflatten(flat, fresh, config.model),
                        shardings.params.to_pure_dict())
  nnx.replace_by_pure_dict(state.params, values)
  # Every process saves its shards to the same path; orbax writes a temporary folder and renames
  # it when all are done, so an interrupted import leaves no init_params behind.
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, state.params)
  io.write_text(io.path(workdir) / "config.json", config.to_json_best_effort(indent=2))
  log.info("imported %d tensors from %s into %s", len(report.imported), hf_dir, path)
  return {"init_params": path, "sources": [s.name for s in sources], "imported": len(report.imported),
          "not_imported": report.not_imported, "adapted": report.adapted}
