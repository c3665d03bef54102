"""Caption generation speed: captions/s of KV-cached greedy and beam decoding at a fixed
length (every row decodes `max_len` - 1 tokens: random weights would otherwise end rows at
random), image encoding included; with `compare_hf`, transformers' `generate()` of the same
sizes, made to run to the same length, timed in the same rounds. The image encoding is also
timed alone on both sides: at the small config it is most of a greedy call, so it bounds the
ratio captioning can reach (`greedy_ratio_bound`: HF's greedy time over our encoding alone,
the ratio if our decoding took no time at all) and the decoding's own ratio is reported apart."""

from __future__ import annotations

import functools

import jax
import ml_collections
from flax import nnx

from klip_jax.bench import hf_blip, inputs, timing
from klip_jax.model import decode
from klip_jax.parallel import hosts
from klip_jax.parallel import mesh as mesh_lib


def throughput(config: ml_collections.ConfigDict, vocab_size: int, *, max_len: int = 32,
               beam_size: int | None = None, rounds: int = 5, compare_hf: bool = False) -> dict:
  beams = {"greedy": 1, "beam": beam_size or config.eval.beam_size}
  mesh, graph, state, _, _, _ = inputs.fresh_model(config, vocab_size)
  tokens = inputs.token_ids(vocab_size)
  images = inputs.random_batch(config, vocab_size)["image"]
  b = images.shape[0]
  # Split over the mesh's batch axes, as `klip eval` captions: handed over from the host, jit
  # would give every device the whole batch, and each would caption all of it.
  on_mesh = hosts.from_host(images, mesh_lib.batch_sharding(mesh))

  @functools.partial(jax.jit, static_argnames="beam")
  def captions(params, images, beam):
    model = nnx.merge(graph, params)
    ids, _ = decode.generate(model, model.encode_image(images)[0], max_len=max_len, dec_id=tokens.dec,
                             sep_id=tokens.sep, pad_id=tokens.pad, beam_size=beam)
    return ids

  contenders = {f"klip_jax_{name}": functools.partial(
      lambda k: jax.block_until_ready(captions(state.params, on_mesh, k)), k) for name, k in beams.items()}
  if compare_hf:
    module = hf_blip.build(config.model, vocab_size, tokens)
    hf_blip.load_params(module, jax.device_get(state.params.to_pure_dict()), config.model)
    for name, k in beams.items():
      contenders[f"hf_{name}"] = functools.partial(hf_blip.captioner(module, tokens, max_len, k), images)
    encode = jax.jit(lambda params, images: nnx.merge(graph, params).encode_image(images)[0])
    contenders["klip_jax_encode"] = lambda: jax.block_until_ready(encode(state.params, on_mesh))
    contenders["hf_encode"] = functools.partial(hf_blip.vision_forward(module), images)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    seconds = timing.interleaved(contenders, rounds=rounds)
  result = {"config": {"batch_size": b, "image_size": config.model.vision.image_size, "max_len": max_len,
                       "beam_size": beams["beam"], "devices": mesh.size}, "rounds": rounds}
  for name in beams:
    result[name] = {"klip_jax_captions_per_s": b / seconds[f"klip_jax_{name}"]}
    if compare_hf:
      result[name]["hf_captions_per_s"] = b / seconds[f"hf_{name}"]
      result[name]["ratio"] = seconds[f"hf_{name}"] / seconds[f"klip_jax_{name}"]
  if compare_hf:
    ours, theirs = seconds["klip_jax_encode"], seconds["hf_encode"]
    result["image_encoding"] = {
        "klip_jax_s": ours, "hf_s": theirs, "ratio": theirs / ours,
        "klip_jax_share_of_greedy": ours / seconds["klip_jax_greedy"],
        "hf_share_of_greedy": theirs / seconds["hf_greedy"],
        "greedy_ratio_bound": seconds["hf_greedy"] / ours,
        "klip_jax_greedy_decoding_s": seconds["klip_jax_greedy"] - ours,
        "hf_greedy_decoding_s": seconds["hf_greedy"] - theirs,
        "greedy_decoding_ratio": (seconds["hf_greedy"] - theirs) / (seconds["klip_jax_greedy"] - ours)}
  return result
