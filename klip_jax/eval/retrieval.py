"""Image-text retrieval on a held-out split: R@1/5/10 both ways and their mean (r_mean).

ITC similarities between every image and every caption of the split; each image's own caption
is its one correct text and vice versa. Chance level of R@k is k / N.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from klip_jax.data import pipeline
from klip_jax.parallel import mesh as mesh_lib

KS = (1, 5, 10)


def recall_at_k(similarity: np.ndarray, ks=KS) -> dict:
  """similarity [N_images, N_texts] with image i matching text i."""
  n = similarity.shape[0]
  out = {}
  for name, sim in (("i2t", similarity), ("t2i", similarity.T)):
    correct = sim[np.arange(n), np.arange(n)][:, None]
    rank = (sim > correct).sum(axis=1)  # 0 = the correct item scores highest (ties favour it)
    for k in ks:
      out[f"{name}_r{k}"] = float(np.mean(rank < k))
  out["r_mean"] = float(np.mean([out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks]))
  out["chance_r_mean"] = float(np.mean([min(k / n, 1.0) for k in ks]))
  return out


def features(graph, params, data_dir, split, codec, mesh, rules, batch_size) -> tuple[np.ndarray, np.ndarray]:
  """L2-normalised ITC features of every image and caption of a split (in split order)."""

  @jax.jit
  def encode(params, images, ids):
    model = nnx.merge(graph, params)
    return model.encode_image(images)[1], model.encode_text(ids, ids != codec.pad_id)[1]

  options = pipeline.PipelineOptions(data_dir, split, batch_size, train=False)
  images, texts, order = [], [], []
  with mesh_lib.logical_context(mesh, rules):
    for batch in pipeline.build(options, codec):
      inputs = pipeline.global_batch({k: batch[k] for k in ("image", "text_ids")}, mesh)
      image_feat, text_feat = jax.device_get(encode(params, inputs["image"], inputs["text_ids"]))
      keep = batch["valid"]
      images.append(image_feat[keep])
      texts.append(text_feat[keep])
      order.append(batch["index"][keep])
  order = np.argsort(np.concatenate(order))
  return np.concatenate(images)[order], np.concatenate(texts)[order]


def evaluate(graph, params, data_dir, split, codec, mesh, rules, batch_size=64) -> dict:
  image_feat, text_feat = features(graph, params, data_dir, split, codec, mesh, rules, batch_size)
  return recall_at_k(image_feat @ text_feat.T)
