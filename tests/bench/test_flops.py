"""Model FLOPs count every layer whatever the layout: a scanned stack counts as the unrolled one
(XLA's cost analysis sees a loop body once), remat's recomputation is not counted, and one more
vision layer adds what a hand count of its matrix products says it should."""

import pytest

from klip_jax import config as config_lib
from klip_jax.bench import flops

VOCAB = 300


def _config(depth: int, scan: bool):
  c = config_lib.load("configs/tiny.py")
  c.model.vision.depth = depth
  c.model.vision.scan_layers = c.model.text.scan_layers = scan
  return c


def _vision_layer_forward_dot_flops(c) -> int:
  """2 * multiply-adds of one ViT layer's matrix products over the batch: qkv, scores,
  scores x values, output projection and the two MLP matrices."""
  v, b = c.model.vision, c.train.batch_size
  t = (v.image_size // v.patch_size) ** 2 + 1  # patches and [CLS]
  d, m = v.width, v.mlp_dim
  return 2 * b * t * (3 * d * d + 2 * t * d + d * d + 2 * d * m)


def test_scanned_layers_count_as_unrolled_and_remat_adds_nothing():
  assert flops.train_step(_config(3, scan=True), VOCAB) == flops.train_step(_config(3, scan=False), VOCAB)
  remat = _config(2, scan=True)
  remat.model.vision.remat = remat.model.text.remat = "full"
  assert flops.train_step(remat, VOCAB) == flops.train_step(_config(2, scan=True), VOCAB)


def test_cudnn_attention_counts_as_xlas():
  """cuDNN's fused attention is a custom call the cost analysis cannot see into (and the CPU
  lowering has no cuDNN): a cuDNN config is counted with XLA's attention, the same arithmetic."""
  c = _config(2, scan=True)
  cudnn = _config(2, scan=True)
  cudnn.model.vision.attention = cudnn.model.text.attention = "cudnn"
  assert flops.train_step(cudnn, VOCAB) == flops.train_step(c, VOCAB)


def test_one_more_layer_adds_its_hand_counted_flops():
  c = _config(2, scan=True)
  assert c.momentum.enabled  # the momentum encoder's forward pass is the fourth
  added = flops.train_step(_config(3, scan=True), VOCAB) - flops.train_step(c, VOCAB)
  # forward, backward (two products per forward one) and the momentum model's forward; the
  # layer norms, softmax, GELU and optimizer update add a few percent on top.
  expected = 4 * _vision_layer_forward_dot_flops(c)
  assert added == pytest.approx(expected, rel=0.08) and added >= expected


def test_relabel_step_flops_grow_with_the_batch():
  c = _config(2, scan=True)
  small, large = flops.relabel_step(c, VOCAB, 8), flops.relabel_step(c, VOCAB, 16)
  assert small > 0 and large == pytest.approx(2 * small, rel=0.05)
