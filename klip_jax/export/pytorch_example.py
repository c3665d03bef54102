"""Retrieval and captioning with a klip_jax export, in PyTorch (torch, transformers, numpy, PIL).

    python example.py [--export DIR]   # DIR: the export root (default: this file's folder)

Reads the test chips in DIR/samples (as the dataset stores them: 16-bit PNG amplitude, or .npy
for float amplitude) with their true captions, ranks every caption for every chip and back by
ITC cosine similarity (recall@1/5/10), and captions three chips greedily. `klip export` wrote
this file; it needs no klip_jax.
"""

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval


def read_chip(path):
  return np.load(path, allow_pickle=False) if path.endswith(".npy") else np.asarray(Image.open(path))


def recall(scores, ks=(1, 5, 10)):
  """Recall@k of a [queries, candidates] score matrix whose item i matches candidate i."""
  correct = scores.diag()[:, None]
  rank = (scores > correct).sum(1)  # 0: the correct candidate scores highest
  return {k: float((rank < k).float().mean()) for k in ks}


@torch.no_grad()
def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--export", default=os.path.dirname(os.path.abspath(__file__)))
  parser.add_argument("--captions", type=int, default=3, help="how many chips to caption")
  args = parser.parse_args()
  samples = os.path.join(args.export, "samples")
  with open(os.path.join(samples, "captions.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  chips = [read_chip(os.path.join(samples, row["file"])) for row in rows]
  truths = [row["caption"] for row in rows]

  retrieval_dir = os.path.join(args.export, "retrieval")
  processor = AutoProcessor.from_pretrained(retrieval_dir, trust_remote_code=True)
  retrieval = BlipForImageTextRetrieval.from_pretrained(retrieval_dir).eval()
  batch = processor(images=chips, text=truths)  # mode="itc": [CLS] first, unimodal text
  cosine = retrieval(**batch, use_itm_head=False).itm_score  # [images, texts]
  i2t, t2i = recall(cosine), recall(cosine.T)
  print(f"ITC retrieval on {len(chips)} chips:")
  print("  image->text " + "  ".join(f"R@{k} {v:.3f}" for k, v in i2t.items()))
  print("  text->image " + "  ".join(f"R@{k} {v:.3f}" for k, v in t2i.items()))

  # trust_remote_code: custom_generate/generate.py hands generation_config.json (klip_jax's
  # decoding rule: greedy from [DEC] to [SEP], no other special token) to BLIP's text decoder.
  captioning = BlipForConditionalGeneration.from_pretrained(os.path.join(args.export, "captioning"),
                                                            trust_remote_code=True).eval()
  out = captioning.generate(pixel_values=batch["pixel_values"][:args.captions])
  tokenizer = processor.tokenizer
  for i, text in enumerate(tokenizer.batch_decode(out, skip_special_tokens=True)):
    print(f"chip {rows[i]['file']}\n  generated: {text}\n  true:      {truths[i]}")


if __name__ == "__main__":
  main()
