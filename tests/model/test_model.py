"""KLIP model: mode shapes, causality, unimodal independence, logical axis names."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from klip_jax import config as config_lib
from klip_jax.model.klip import KLIP
from klip_jax.parallel import mesh as mesh_lib

VOCAB = 97


@pytest.fixture(scope="module")
def setup():
  config = config_lib.load("configs/tiny.py")
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    model = KLIP(config.model, VOCAB, rngs=nnx.Rngs(params=0))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((3, 32, 32, 1)), jnp.float32)
  ids = jnp.asarray(rng.integers(7, VOCAB, (3, 12)), jnp.int32)
  return config, mesh, model, images, ids


def test_mode_shapes(setup):
  config, mesh, model, images, ids = setup
  pad = jnp.ones(ids.shape, bool)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    tokens, image_feat = model.encode_image(images)
    hidden, text_feat = model.text(ids, pad, "text"), model.encode_text(ids, pad)
    itm = model.itm_logits(ids, pad, tokens)
    logits = model.decoder_logits(ids, pad, tokens)
  assert tokens.shape == (3, 1 + 16, 64) and image_feat.shape == (3, 32)
  assert hidden.shape == (3, 12, 64) and text_feat.shape == (3, 32)
  np.testing.assert_allclose(jnp.linalg.norm(image_feat, axis=-1), 1.0, rtol=1e-5)
  assert itm.shape == (3, 2) and logits.shape == (3, 12, VOCAB)


def test_decoder_is_causal(setup):
  config, mesh, model, images, ids = setup
  pad = jnp.ones(ids.shape, bool)
  changed = ids.at[:, 6].set((ids[:, 6] + 1) % VOCAB)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    tokens, _ = model.encode_image(images)
    before = model.decoder_logits(ids, pad, tokens)
    after = model.decoder_logits(changed, pad, tokens)
  np.testing.assert_allclose(before[:, :6], after[:, :6], atol=1e-6)
  assert np.abs(before[:, 6:] - after[:, 6:]).max() > 1e-4


def test_unimodal_text_ignores_the_image_and_multimodal_uses_it(setup):
  config, mesh, model, images, ids = setup
  pad = jnp.ones(ids.shape, bool)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    tokens, _ = model.encode_image(images)
    a = model.text(ids, pad, "text", tokens)
    b = model.text(ids, pad, "text", tokens[::-1])
    c = model.text(ids, pad, "multimodal", tokens)
    d = model.text(ids, pad, "multimodal", tokens[::-1])
  np.testing.assert_array_equal(a, b)
  assert np.abs(c[0] - d[0]).max() > 1e-4


def test_first_only_and_shared_image_projections_compute_the_full_pass(setup):
  """The [CLS]-only last layer and per-image key/value projections (the train step's savings)
  give what the full pass over repeated images gives."""
  config, mesh, model, images, ids = setup
  pad = jnp.arange(12)[None] < jnp.asarray([[12], [9], [5]])
  index = jnp.asarray([0, 2, 2, 1, 0, 1])
  rows = ids[jnp.asarray([0, 1, 2, 0, 1, 2])]
  row_pad = pad[jnp.asarray([0, 1, 2, 0, 1, 2])]
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    tokens, _ = model.encode_image(images)
    full_text = model.text(ids, pad, "text")
    first_text = model.text(ids, pad, "text", first_only=True)
    full_pairs = model.text(rows, row_pad, "multimodal", tokens[index])
    first_pairs = model.text(rows, row_pad, "multimodal", tokens, image_index=index, first_only=True)
    shared_pairs = model.text(rows, row_pad, "multimodal", tokens, image_index=index)
    # Without an index, consecutive rows share an image: rows 0-1 read image 0, 2-3 image 1, ...
    grouped_pairs = model.text(rows, row_pad, "multimodal", tokens)
    grouped_first = model.text(rows, row_pad, "multimodal", tokens, first_only=True)
    full_grouped = model.text(rows, row_pad, "multimodal", jnp.repeat(tokens, 2, axis=0))
  assert first_text.shape == (3, 1, 64) and first_pairs.shape == (6, 1, 64)
  np.testing.assert_allclose(first_text[:, 0], full_text[:, 0], atol=2e-5)
  np.testing.assert_allclose(first_pairs[:, 0], full_pairs[:, 0], atol=2e-5)
  np.testing.assert_allclose(shared_pairs, full_pairs, atol=2e-5)
  np.testing.assert_allclose(grouped_pairs, full_grouped, atol=2e-5)
  np.testing.assert_allclose(grouped_first[:, 0], full_grouped[:, 0], atol=2e-5)
  with pytest.raises(ValueError, match="grouped"):
    model.text(rows[:5], row_pad[:5], "multimodal", tokens)


def test_padding_does_not_leak_into_real_tokens(setup):
  config, mesh, model, _images, ids = setup
  pad = jnp.arange(12)[None] < 8
  other = ids.at[:, 8:].set(3)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    a = model.text(ids, jnp.broadcast_to(pad, ids.shape), "text")
    b = model.text(other, jnp.broadcast_to(pad, ids.shape), "text")
  np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-6)


def test_position_embeddings_interpolate_to_a_new_resolution(setup):
  config, mesh, model, images, _ = setup
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    big = jax.image.resize(images, (3, 48, 48, 1), "nearest")
    tokens, _ = model.encode_image(big)
  assert tokens.shape == (3, 1 + 36, 64)


@pytest.mark.parametrize("old, new", [(4, 6), (6, 4), (14, 24), (24, 14), (5, 5)])
def test_position_interpolation_is_blips_torch_bicubic(old, new):
  """BLIP fine-tunes at a new resolution, and HF BLIP's interpolate_pos_encoding runs, through
  torch's bicubic resize (align_corners=False): an exported model fed another resolution, or a
  checkpoint imported at another size, must see the position embeddings PyTorch computes."""
  import torch

  from klip_jax.model import vit

  pos = np.random.default_rng(old * new).standard_normal((1, 1 + old * old, 8)).astype(np.float32)
  grid = torch.from_numpy(pos[:, 1:]).reshape(1, old, old, 8).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
  got = np.asarray(vit.interpolate_positions(jnp.asarray(pos), new))
  assert got.shape == (1, 1 + new * new, 8)
  np.testing.assert_array_equal(got[:, 0], pos[:, 0])
  np.testing.assert_allclose(got[:, 1:], want.permute(0, 2, 3, 1).reshape(1, -1, 8).numpy(), rtol=1e-5, atol=1e-5)


def test_every_matrix_parameter_has_logical_axis_names(setup):
  _, _, model, _, _ = setup
  params = nnx.state(model, nnx.Param)
  for path, variable in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    names = getattr(variable, "out_sharding", None)
    if variable[...].ndim == 0:
      continue  # the temperature
    assert names is not None and len(names) == variable[...].ndim, (path, names)


def test_text_beyond_the_position_embeddings_is_refused(setup):
  """A position past max_len has no embedding (jnp.take would read NaN): the decoder's prefill
  must refuse such a caption as the forward pass does."""
  config, mesh, model, images, _ = setup
  ids = jnp.full((1, config.model.text.max_len + 1), 9, jnp.int32)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    tokens, _ = model.encode_image(images[:1])
    for run in (lambda: model.text(ids, ids > 0, "text"), lambda: model.text.prefill(ids, ids > 0, tokens)):
      with pytest.raises(ValueError, match="129 tokens exceed the model's max_len 128"):
        run()


def test_decoder_shares_everything_but_self_attention():
  config = config_lib.load("configs/tiny.py")
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    shared = nnx.state(KLIP(config.model, VOCAB, rngs=nnx.Rngs(params=0)), nnx.Param)
    config.model.share_decoder = False
    untied = nnx.state(KLIP(config.model, VOCAB, rngs=nnx.Rngs(params=0)), nnx.Param)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  layers = shared["text"]["layers"]
  assert "causal_attn" in layers[0] and "decoder" not in shared
  assert "decoder" in untied and "causal_attn" not in untied["text"]["layers"][0]
  causal = sum(count(layers[i]["causal_attn"]) for i in range(len(layers)))
  # Untied: a second full text tower, and neither tower holds a separate causal attention.
  assert count(untied) - count(shared) == count(shared["text"]) - 2 * causal


@pytest.mark.slow  # a parity run: scan == loop
def test_scanned_layers_compute_what_the_layer_loop_computes(setup):
  config, mesh, model, images, ids = setup
  scan_config = config.copy_and_resolve_references()
  scan_config.model.vision.update(scan_layers=True, remat="full")
  scan_config.model.text.update(scan_layers=True, remat="dots")
  pad = jnp.ones(ids.shape, bool)
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    scanned = KLIP(scan_config.model, VOCAB, rngs=nnx.Rngs(params=1))
    pure = nnx.state(model, nnx.Param).to_pure_dict()
    # The scanned model gets the loop model's weights: layer i at index i of the "layers" axis.
    for tower, name in (("vision", "blocks"), ("text", "layers")):
      per_layer = [pure[tower][name][i] for i in sorted(pure[tower][name])]
      pure[tower][name] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    stacked = nnx.state(scanned, nnx.Param)
    stacked.replace_by_pure_dict(pure)
    nnx.update(scanned, stacked)
    tokens_a, feat_a = model.encode_image(images)
    tokens_b, feat_b = scanned.encode_image(images)
    np.testing.assert_allclose(feat_b, feat_a, atol=1e-5)
    np.testing.assert_allclose(scanned.decoder_logits(ids, pad, tokens_b),
                               model.decoder_logits(ids, pad, tokens_a), atol=1e-4)
    index = jnp.asarray([2, 0, 1])  # the first_only and image_index paths, scanned
    np.testing.assert_allclose(scanned.itm_logits(ids, pad, tokens_b, index),
                               model.itm_logits(ids, pad, tokens_a, index), atol=1e-4)
    np.testing.assert_allclose(scanned.encode_text(ids, pad), model.encode_text(ids, pad), atol=1e-5)
    grads = jax.grad(lambda m: m.itm_logits(ids, pad, m.encode_image(images)[0]).sum())(scanned)
    assert jax.tree.leaves(grads)


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_is_pytorchs_and_its_gradient_too(approximate):
  """Exact GELU against PyTorch's (HF BLIP's "gelu"), tanh GELU against "gelu_pytorch_tanh",
  values and gradients, over the far tails where erf and erfc forms could part."""
  import torch

  from klip_jax.model import layers

  x = np.concatenate([np.linspace(-12, 12, 4001), [-30.0, 30.0]]).astype(np.float32)
  t = torch.tensor(x, requires_grad=True)
  want = torch.nn.functional.gelu(t, approximate="tanh" if approximate else "none")
  want.sum().backward()
  act = layers.gelu(approximate)
  grad = jax.grad(lambda v: jnp.sum(act(v)))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(act(jnp.asarray(x))), want.detach().numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), t.grad.numpy(), rtol=1e-5, atol=1e-5)
  assert act(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def _numpy_attention(q, k, v, mask):
  """softmax(q k^T / sqrt(d)) v per head, in float64; q/k/v [B, T, heads, d], mask [B, 1, T, S]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnd->btnd", weights, v)


def _attention_against_numpy(dtype, causal, tolerance):
  """Our attention over two rows of 5 tokens (the second padded after 3) against numpy's, with
  the mask written out by hand. An odd length: the cuDNN path pads it to 6."""
  from klip_jax.model import layers

  config = config_lib.load("configs/tiny.py")
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 32)), dtype)
  valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  keep = valid[:, None, None, :] & (np.tri(5, dtype=bool) if causal else np.ones((5, 5), bool))
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    layer = layers.Attention(32, 4, fused_qkv=True, std=0.2, dtype=dtype, param_dtype=jnp.float32,
                             rngs=nnx.Rngs(params=0))
    q, k, v = (np.asarray(t, np.float64) for t in layer.project(x))
    got = np.asarray(layer(x, mask=layers.TextMask(jnp.asarray(valid), causal=causal)), np.float64)
  heads = _numpy_attention(q, k, v, keep).reshape(2, 5, 32)
  expected = heads @ np.asarray(layer.out.kernel.value, np.float64) + np.asarray(layer.out.bias.value, np.float64)
  np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_is_masked_softmax_attention(dtype, causal):
  _attention_against_numpy(dtype, causal, 1e-5 if dtype == jnp.float32 else 5e-2)


def test_bf16_attention_scores_are_not_rounded_to_bf16():
  """Peaked bf16 attention (score std ~9, as trained heads have) against float64 on the same bf16
  inputs, in both layouts: the full pass on a CPU and the cached decoder step everywhere. Scores
  rounded to bf16 before the softmax were off by 0.085 here, jax.nn.dot_product_attention's 0.012."""
  from klip_jax.model import layers

  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.standard_normal((2, 32, 4, 64)) * 3, jnp.bfloat16) for _ in range(2))
  v = jnp.asarray(rng.standard_normal((2, 32, 4, 64)), jnp.bfloat16)
  keep = np.arange(32)[None, None, None, :] < np.array([32, 20])[:, None, None, None]
  want = _numpy_attention(q, k, v, keep)
  full = layers._softmax_attention(q, k, v, jnp.asarray(keep), kv_layout="bsnd")
  cached = layers._softmax_attention(q, layers.heads_first(k), layers.heads_first(v), jnp.asarray(keep),
                                     kv_layout="bnsd")
  for got in (full, cached):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=0.025)


def _xla_in_place_of_cudnn(monkeypatch) -> list:
  """cuDNN needs an NVIDIA GPU, so jax's XLA implementation of the same call (it reads the same
  arguments) stands in for it: the backend reads "gpu", and each call's (q, k, kwargs) is kept."""
  from klip_jax.model import layers

  calls, jax_attention = [], jax.nn.dot_product_attention

  def attention(q, k, v, **kwargs):
    calls.append((q, k, dict(kwargs)))
    assert kwargs.pop("implementation") == "cudnn" and "mask" not in kwargs
    return jax_attention(q, k, v, implementation="xla", **kwargs)

  monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(layers.jax.nn, "dot_product_attention", attention)
  return calls


@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_attention_is_given_the_same_mask(monkeypatch, causal):
  """The "cudnn" path hands cuDNN the mask as key counts and a causal flag: what reaches it must
  be the mask numpy is given."""
  from klip_jax.model import layers

  calls = _xla_in_place_of_cudnn(monkeypatch)
  real_attention = layers.Attention.__init__

  def cudnn_attention(self, *args, **kwargs):
    real_attention(self, *args, **{**kwargs, "implementation": "cudnn"})

  monkeypatch.setattr(layers.Attention, "__init__", cudnn_attention)
  _attention_against_numpy(jnp.float32, causal, 1e-5)
  assert calls and calls[0][2]["is_causal"] == causal
  np.testing.assert_array_equal(calls[0][2]["key_value_seq_lengths"], [5, 3])


def test_cudnn_attention_pads_odd_lengths_without_a_mask(monkeypatch):
  """A ViT's 1 + 14 x 14 tokens: cuDNN is given an even length, and the padding key is left out."""
  from klip_jax.model import layers

  calls = _xla_in_place_of_cudnn(monkeypatch)
  q, k, v = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2, 5, 2, 8)), jnp.float32)
  np.testing.assert_allclose(layers._cudnn_attention(q, k, v, None), _numpy_attention(q, k, v, True),
                             rtol=1e-5, atol=1e-5)
  (padded_q, padded_k, kwargs), = calls
  assert (padded_q.shape[1], padded_k.shape[1]) == (6, 6)
  np.testing.assert_array_equal(kwargs["key_value_seq_lengths"], [5, 5])


@pytest.mark.parametrize("attention, dtype, match", [
    ("flash", "bfloat16", "model.text.attention: use 'auto', 'xla' or 'cudnn'"),
    ("cudnn", "float32", "model.text.attention: cuDNN's fused attention runs in bfloat16 only"),
])
def test_attention_config_is_validated(attention, dtype, match):
  from klip_jax.errors import ConfigError

  c = config_lib.load("configs/tiny.py",
                      [f"--config.model.text.attention={attention}", f"--config.model.dtype={dtype}"])
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(c)


def test_auto_attention_is_cudnn_on_a_gpu_in_bfloat16_only(monkeypatch):
  from klip_jax.model import layers

  assert layers.resolve_attention("auto", jnp.bfloat16) == "xla"  # this CPU
  monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
  assert layers.resolve_attention("auto", jnp.bfloat16) == "cudnn"
  assert layers.resolve_attention("auto", jnp.float32) == "xla"
  assert layers.resolve_attention("xla", jnp.bfloat16) == "xla"


def test_cudnn_attention_refuses_a_cpu():
  from klip_jax.model import layers

  config = config_lib.load("configs/tiny.py")
  with mesh_lib.logical_context(mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]), config.mesh.rules):
    layer = layers.Attention(32, 4, fused_qkv=True, std=0.2, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                             rngs=nnx.Rngs(params=0), implementation="cudnn")
    with pytest.raises(ValueError, match="NVIDIA GPUs only.*'xla'"):
      layer(jnp.ones((1, 4, 32), jnp.bfloat16))


@pytest.mark.slow
def test_a_bf16_train_step_runs_under_klips_xla_flags(tmp_path):
  """With klip's XLA:CPU flags (YNNPACK's dot fusions off, klip_jax/xla_flags.py) and XLA's
  passes on, XLA:CPU could not compile the backward of jax.nn.dot_product_attention's bf16 dots
  ("UNIMPLEMENTED: Dot with multiple contracting dimensions"): a bf16 config (base.py) failed on
  the CPU."""
  # One device, klip's own flags and XLA's passes, as a user's `klip` process has them.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "0"}
  env.pop("XLA_FLAGS", None)
  out = tmp_path / "bench.json"
  run = subprocess.run([sys.executable, "-m", "klip_jax.cli", "bench", "train", "--config", "configs/tiny.py",
                        "--config.model.dtype=bfloat16", "--rounds", "1", "--json", str(out)],
                       env=env, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-2000:]
  assert json.loads(out.read_text())["train"]["klip_jax"]["images_per_s"] > 0
