"""What a user would otherwise run: BLIP pretraining in PyTorch, assembled from Hugging Face
transformers' BLIP modules at the sizes of a klip_jax config, for `klip bench --compare-hf`.

`BlipPretraining` is the like-for-like model: `BlipVisionModel` (with a one-channel patch
embedding, as SAR chips have one channel), a `BlipTextModel` encoder with cross-attention
(unimodal for ITC, image-grounded for ITM), a `BlipTextLMHeadModel` decoder that shares every
weight but its self-attention with the encoder (BLIP's `tie_encoder_decoder_weights`, our
`share_decoder`), the two ITC projections, the ITM head and the temperature. Its parameter
count equals klip_jax's for the same config (tests/bench checks it), so the timings compare
the same work. `step` is BLIP's pretraining step without momentum: one vision pass, ITC, ITM on
the positive and one hard-negative pair each way (drawn from the similarity softmax, as BLIP
does), the image-grounded decoder loss on the masked keyword positions, AdamW with clipping.

Where jax runs on a GPU, the PyTorch side runs on CUDA too (`device`), under bf16 autocast when
the config computes in bf16 (as ours does), and every timed call waits for its GPU work.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import ml_collections
import numpy as np

from klip_jax.data.tokenizer import TokenIds
from klip_jax.errors import ConfigError
from klip_jax.export import hf


def _tie_decoder(encoder, decoder) -> None:
  """Share the decoder's embeddings, cross-attention and FFN with the encoder (BLIP)."""
  decoder.bert.embeddings = encoder.embeddings
  for enc, dec in zip(encoder.encoder.layer, decoder.bert.encoder.layer):
    dec.crossattention, dec.intermediate, dec.output = enc.crossattention, enc.intermediate, enc.output
  decoder.cls.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight


def device():
  """Where PyTorch runs: on the hardware jax runs on, so that the two are timed like for like:
  the CPU (virtual CPU devices share its cores), or the GPU when jax has one. PyTorch anywhere
  else would be timed on other hardware than ours (a TPU's host CPU, one GPU beside our several,
  the CPU under a torch build that cannot use the GPU), so those are refused."""
  torch, _, _ = hf.require()
  backend = jax.default_backend()
  if backend == "cpu":
    return torch.device("cpu")
  if backend != "gpu":
    raise ConfigError(f"--compare-hf: jax runs on {backend.upper()} and PyTorch has no {backend.upper()} backend "
                      "here, so it would run on the host CPU; compare on a GPU or CPU machine, or drop "
                      "--compare-hf.")
  if not torch.cuda.is_available():
    raise ConfigError(f"--compare-hf: jax runs on the GPU but torch {torch.__version__} cannot use the GPU (a CPU "
                      "build, or one whose CUDA the driver does not support), so it would run on the CPU; install "
                      "a CUDA build of torch or drop --compare-hf.")
  if jax.device_count() > 1:
    raise ConfigError(f"--compare-hf: jax would run on all {jax.device_count()} GPUs and PyTorch on one; make one "
                      "visible (CUDA_VISIBLE_DEVICES=0, as launch/bench_gpu.sh does with --compare-hf) or drop "
                      "--compare-hf.")
  return torch.device("cuda")


def _autocast(module):
  """bf16 autocast on the module's device when the config computes in bf16, else nothing."""
  torch, _, _ = hf.require()
  if not module.bf16:
    return contextlib.nullcontext()
  return torch.autocast(module.device.type, dtype=torch.bfloat16)


def _wait(module) -> None:
  """Block until the module's device has finished its queued work (timings end here)."""
  torch, _, _ = hf.require()
  if module.device.type == "cuda":
    torch.cuda.synchronize(module.device)


def _images(module, images: np.ndarray):
  """NHWC numpy images -> NCHW tensor on the module's device."""
  torch, _, _ = hf.require()
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(module.device)


def build(model: ml_collections.ConfigDict, vocab_size: int, tokens: TokenIds) -> Any:
  """A `BlipPretraining` (torch.nn.Module) with the sizes of klip_jax's `config.model`, on
  `device()`."""
  torch, transformers, _ = hf.require()
  from transformers.models.blip import modeling_blip_text

  class BlipPretraining(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.config = config = hf.blip_config(model, vocab_size, tokens)
      self.vision = transformers.BlipVisionModel(config.vision_config)
      v = config.vision_config
      self.vision.embeddings.patch_embedding = torch.nn.Conv2d(1, v.hidden_size, v.patch_size, v.patch_size)
      self.text = modeling_blip_text.BlipTextModel(config.text_config, add_pooling_layer=False)
      self.decoder = modeling_blip_text.BlipTextLMHeadModel(config.text_config)
      if model.share_decoder:
        _tie_decoder(self.text, self.decoder)
      self.vision_proj = torch.nn.Linear(model.vision.width, model.embed_dim)
      self.text_proj = torch.nn.Linear(model.text.width, model.embed_dim)
      self.itm_head = torch.nn.Linear(model.text.width, 2)
      self.temp = torch.nn.Parameter(torch.tensor(float(model.temp_init)))
      self.device, self.bf16 = device(), model.dtype == "bfloat16"

  module = BlipPretraining()
  return module.to(module.device)


# HF model prefixes of the export's state dicts -> this module's attribute names.
_PREFIXES = (("vision_model.", "vision."), ("text_encoder.", "text."), ("text_decoder.", "decoder."))


def load_params(module, params, model: ml_collections.ConfigDict) -> None:
  """Give `module` klip_jax's parameters (`params`: the model's pure dict), through the same
  mapping `klip export` uses, so both sides compute the same numbers (and relabelling flags
  the same clauses). The patch kernel goes back to one channel (the export spreads it on RGB)."""
  torch, _, _ = hf.require()
  flat = hf.flatten(params, model)
  tensors = {**hf.to_hf(flat, hf.retrieval_entries(model)), **hf.to_hf(flat, hf.captioning_entries(model))}
  patch = "vision_model.embeddings.patch_embedding.weight"
  tensors[patch] = tensors[patch].sum(axis=1, keepdims=True)
  state = {}
  for name, value in tensors.items():
    for theirs, ours in _PREFIXES:
      name = ours + name.removeprefix(theirs) if name.startswith(theirs) else name
    state[name] = torch.from_numpy(np.array(value))
  state["temp"] = torch.tensor(float(np.asarray(params["temp"])))
  missing, unexpected = module.load_state_dict(state, strict=False)
  tied = {"decoder.cls.predictions.decoder.weight", "decoder.cls.predictions.decoder.bias"}
  shared = {n for n in missing if n.startswith("decoder.bert.") or n in tied}
  if unexpected or set(missing) - shared:
    raise ValueError(f"klip_jax -> HF bench model: unexpected {sorted(unexpected)[:5]}, "
                     f"missing {sorted(set(missing) - shared)[:5]}")


def parameter_count(module) -> int:
  """Trainable parameters, each shared tensor counted once (torch deduplicates them)."""
  return sum(p.numel() for p in module.parameters())


def make_step(module, config: ml_collections.ConfigDict, tokens: TokenIds, seed: int = 0):
  """step(batch of numpy arrays) -> loss: one BLIP pretraining step with AdamW, in place."""
  torch, _, _ = hf.require()
  f = torch.nn.functional
  optim = config.optim
  decay = [p for n, p in module.named_parameters() if p.ndim > 1]
  no_decay = [p for n, p in module.named_parameters() if p.ndim <= 1]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=optim.lr, betas=(optim.b1, optim.b2))
  dev = module.device
  generator = torch.Generator(device=dev).manual_seed(seed)
  lo, hi = config.model.temp_range
  mask_prob, random_prob = config.loss.mask_prob, config.loss.random_prob

  def step(batch: dict) -> float:
    image = _images(module, batch["image"])
    ids = torch.from_numpy(batch["text_ids"]).long().to(dev)
    keywords = torch.from_numpy(batch["keyword_mask"]).bool().to(dev)
    attention = (ids != tokens.pad).long()
    b = ids.shape[0]
    with _autocast(module):  # the loss in bf16 where the config computes in bf16, as ours does
      image_embeds = module.vision(pixel_values=image).last_hidden_state
      image_feat = f.normalize(module.vision_proj(image_embeds[:, 0]), dim=-1)
      text_hidden = module.text(input_ids=ids, attention_mask=attention, is_decoder=False).last_hidden_state
      text_feat = f.normalize(module.text_proj(text_hidden[:, 0]), dim=-1)
      sim_i2t = image_feat @ text_feat.t() / module.temp
      sim_t2i = sim_i2t.t()
      target = torch.arange(b, device=dev)
      loss_itc = (f.cross_entropy(sim_i2t, target) + f.cross_entropy(sim_t2i, target)) / 2

      with torch.no_grad():
        eye = torch.eye(b, dtype=torch.bool, device=dev)
        neg_text = torch.multinomial(f.softmax(sim_i2t.masked_fill(eye, -torch.inf), 1), 1, generator=generator)[:, 0]
        neg_image = torch.multinomial(f.softmax(sim_t2i.masked_fill(eye, -torch.inf), 1), 1, generator=generator)[:, 0]
      enc_ids = ids.clone()
      enc_ids[:, 0] = tokens.enc
      pair_ids = torch.cat([enc_ids, enc_ids, enc_ids[neg_text]])
      pair_images = torch.cat([image_embeds, image_embeds[neg_image], image_embeds])
      pair_hidden = module.text(input_ids=pair_ids, attention_mask=(pair_ids != tokens.pad).long(),
                                encoder_hidden_states=pair_images, is_decoder=False).last_hidden_state
      labels = torch.cat([torch.ones(b, dtype=torch.long, device=dev),
                          torch.zeros(2 * b, dtype=torch.long, device=dev)])
      loss_itm = f.cross_entropy(module.itm_head(pair_hidden[:, 0]), labels)

      # Keyword reconstruction: BERT's 80/10/10 corruption at the keyword positions.
      selected = keywords & attention.bool()
      selected[:, 0] = False
      draw = torch.rand(ids.shape, generator=generator, device=dev)
      dec_in = torch.where(selected & (draw < mask_prob), tokens.mask, ids)
      random_ids = torch.randint(tokens.separator + 1, tokens.vocab_size, ids.shape, generator=generator,
                                 device=dev)
      dec_in = torch.where(selected & (draw >= mask_prob) & (draw < mask_prob + random_prob), random_ids, dec_in)
      dec_in[:, 0] = tokens.dec
      logits = module.decoder(input_ids=dec_in, attention_mask=attention, encoder_hidden_states=image_embeds,
                              return_dict=True).logits
      loss_rec = f.cross_entropy(logits[selected], ids[selected]) if selected.any() else logits.sum() * 0

      loss = config.loss.itc * loss_itc + config.loss.itm * loss_itm + config.loss.recon * loss_rec
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), optim.grad_clip)
    opt.step()
    with torch.no_grad():
      module.temp.clamp_(lo, hi)
    return loss.detach().item()

  return step


def vision_forward_backward(module):
  """The kernel baseline: the vision tower's forward + backward alone, -> fn(images)."""

  def run(images: np.ndarray) -> None:
    x = _images(module, images)
    module.vision.zero_grad(set_to_none=True)
    with _autocast(module):
      loss = module.vision(pixel_values=x).last_hidden_state.float().square().mean()
    loss.backward()
    _wait(module)

  return run


def vision_forward(module):
  """The vision tower's forward alone (what captioning spends before its first token) -> fn(images)."""
  torch, _, _ = hf.require()

  def run(images: np.ndarray) -> None:
    with torch.no_grad(), _autocast(module):
      module.vision(pixel_values=_images(module, images))
    _wait(module)

  return run


def captioner(module, tokens: TokenIds, max_len: int, beam_size: int):
  """fn(images) -> ids: `generate()` of a BlipForConditionalGeneration holding this module's
  vision tower and decoder, `max_len` tokens exactly ([SEP] is not allowed to end a row early)."""
  torch, transformers, _ = hf.require()
  generator = transformers.BlipForConditionalGeneration(module.config)
  generator.vision_model = module.vision
  generator.text_decoder = module.decoder
  generator.to(module.device).eval()

  def run(images: np.ndarray):
    with torch.no_grad(), _autocast(module):
      ids = generator.generate(pixel_values=_images(module, images), max_length=max_len, min_length=max_len,
                               num_beams=beam_size, do_sample=False)
    return ids.cpu()

  return run


def relabeller(module, tokens: TokenIds, *, max_clauses: int, max_fill: int):
  """fn(batch) -> (flagged [B], corrected ids [B, L]): SCIO's screening and proofreading as a
  straightforward PyTorch implementation on these modules would do it: leave-one-clause-out
  variants built per caption, ITC and ITM of all of them in one batch, the paper's rule
  (removing the clause raises both scores; the largest ITC gain), then the flagged keyword
  rewritten greedily by the decoder, one full decoder pass per written token."""
  torch, _, _ = hf.require()
  f = torch.nn.functional
  special = list(tokens.special())

  def variants(ids, clause_ids):
    b, length = ids.shape
    out = np.full((b, max_clauses + 1, length), tokens.pad, ids.dtype)
    valid = np.zeros((b, max_clauses), bool)
    for r in range(b):
      out[r, 0] = ids[r]
      last = clause_ids[r].max()
      for k in range(max_clauses):
        remove = clause_ids[r] == k
        if k == last and k > 0:
          remove |= (clause_ids[r] == k - 1) & (ids[r] == tokens.separator)
        kept = ids[r][~remove]
        out[r, k + 1, :len(kept)] = kept
        valid[r, k] = (clause_ids[r] == k).any() and last > 0
    return out, valid

  def run(batch: dict):
    ids, keywords, clause_ids = batch["text_ids"], batch["keyword_mask"], batch["clause_ids"]
    b, length = ids.shape
    all_ids, valid = variants(ids, clause_ids)
    all_ids = torch.from_numpy(all_ids.reshape(b * (max_clauses + 1), length)).long().to(module.device)
    attention = (all_ids != tokens.pad).long()
    image = _images(module, batch["image"])
    with torch.no_grad(), _autocast(module):
      image_embeds = module.vision(pixel_values=image).last_hidden_state
      image_feat = f.normalize(module.vision_proj(image_embeds[:, 0]), dim=-1)
      text = module.text(input_ids=all_ids, attention_mask=attention, is_decoder=False).last_hidden_state
      text_feat = f.normalize(module.text_proj(text[:, 0]), dim=-1).view(b, max_clauses + 1, -1)
      itc = torch.einsum("be,bke->bk", image_feat, text_feat)
      enc_ids = all_ids.clone()
      enc_ids[:, 0] = tokens.enc
      repeated = image_embeds.repeat_interleave(max_clauses + 1, dim=0)
      hidden = module.text(input_ids=enc_ids, attention_mask=attention, encoder_hidden_states=repeated,
                           is_decoder=False).last_hidden_state
      itm = f.softmax(module.itm_head(hidden[:, 0]), dim=-1)[:, 1].view(b, max_clauses + 1)
      itc_gain, itm_gain = itc[:, 1:] - itc[:, :1], itm[:, 1:] - itm[:, :1]
      score = torch.where(torch.minimum(itc_gain, itm_gain) > 0, 1.0 + itc_gain, -torch.inf)
      score = score.masked_fill(~torch.from_numpy(valid).to(module.device), -torch.inf)
      best = score.argmax(1)
      flagged = torch.where(torch.isfinite(score.gather(1, best[:, None])[:, 0]), best, -1).cpu().numpy()

      # Proofreading: greedy, the decoder re-run over the caption for every token it writes.
      corrected = ids.copy()
      rows = np.flatnonzero(flagged >= 0)
      if len(rows):
        span = (keywords[rows] > 0) & (clause_ids[rows] == flagged[rows, None])
        start = span.argmax(1)
        after = ids[rows, np.minimum(start + span.sum(1), length - 1)]
        work = torch.from_numpy(ids[rows]).long().to(module.device)
        work[:, 0] = tokens.dec
        image_rows = image_embeds[torch.from_numpy(rows).to(module.device)]
        written = [[] for _ in rows]
        done = np.zeros(len(rows), bool)
        for j in range(max_fill):
          logits = module.decoder(input_ids=work, attention_mask=(work != tokens.pad).long(),
                                  encoder_hidden_states=image_rows, return_dict=True).logits
          position = np.minimum(start - 1 + j, length - 1)
          scores = logits[torch.arange(len(rows)), torch.from_numpy(position)].float().cpu().numpy()
          # Never a special token; a stop token ends the keyword, but not as its first token.
          for i in range(len(rows)):
            stops = [after[i], tokens.separator, tokens.sep]
            scores[i, [t for t in special if j == 0 or t not in stops]] = -np.inf
            if j == 0:
              scores[i, stops] = -np.inf
          token = scores.argmax(-1)
          for i, t in enumerate(token):
            if done[i] or t in (after[i], tokens.separator, tokens.sep):
              done[i] = True
              continue
            written[i].append(int(t))
            if start[i] + j < length:
              work[i, start[i] + j] = int(t)
          if done.all():
            break
        for i, r in enumerate(rows):
          old = np.flatnonzero(span[i])
          row = np.concatenate([ids[r, :old[0]], written[i], ids[r, old[-1] + 1:]])
          row = row[row != tokens.pad]
          if len(row) > length:  # cut as the tokenizer cuts: [SEP] last
            row = np.append(row[:length - 1], tokens.sep)
          corrected[r] = np.pad(row, (0, length - len(row)), constant_values=tokens.pad)
    return flagged, corrected

  return run
