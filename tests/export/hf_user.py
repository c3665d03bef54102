"""A PyTorch user's session on a klip_jax export, run as its own process that never imports jax
or klip_jax (tests/export/test_processor.py starts it):

    python tests/export/hf_user.py EXPORT_DIR REFERENCE_DIR

It loads the folders with AutoProcessor/AutoTokenizer and the BLIP classes, reads the sample
chips as a user would (PIL / numpy), and compares with what klip_jax computed on the same
chips and captions (REFERENCE_DIR/reference.npz + captions.json). Exits non-zero on the first
difference.
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, BlipForConditionalGeneration, BlipForImageTextRetrieval


def close(name, ours, theirs, atol):
  diff = float(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64)).max())
  assert diff <= atol, f"{name}: max abs difference {diff} > {atol}"
  print(f"{name}: max abs difference {diff:.2e}")


def refuses(call, message):
  try:
    call()
  except ValueError as e:
    assert message in str(e), f"refused, but the message lacks {message!r}: {e}"
    return str(e)
  raise AssertionError(f"accepted an input it should refuse ({message!r})")


@torch.no_grad()
def main(export, reference):
  ref = dict(np.load(os.path.join(reference, "reference.npz")))
  with open(os.path.join(reference, "captions.json")) as f:
    texts = json.load(f)
  with open(os.path.join(export, "samples", "captions.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["caption"] for r in rows] == texts["true"] and [r["noisy_caption"] for r in rows] == texts["noisy"]
  chips = [np.asarray(Image.open(os.path.join(export, "samples", r["file"]))) for r in rows]
  assert chips[0].dtype == np.uint16, chips[0].dtype

  folders = {name: os.path.join(export, name) for name in ("retrieval", "captioning")}
  processors = {name: AutoProcessor.from_pretrained(f, trust_remote_code=True) for name, f in folders.items()}
  tokenizers = {name: AutoTokenizer.from_pretrained(f) for name, f in folders.items()}
  processor, tokenizer = processors["retrieval"], tokenizers["retrieval"]
  assert type(processor).__name__ == "KlipSarProcessor", type(processor)

  # Text: the codec's ids, on every caption klip_jax encoded.
  everything = texts["true"] + texts["noisy"] + texts["more"]
  for name, tok in tokenizers.items():
    ids = tok(everything, padding="max_length", truncation=True)["input_ids"]
    np.testing.assert_array_equal(np.asarray(ids), ref["codec_ids"], err_msg=f"{name} tokenizer ids")
  assert tokenizer.batch_decode(ref["codec_ids"][:len(rows)], skip_special_tokens=True) == texts["decoded"]
  first = {mode: tokenizer.convert_tokens_to_ids(token)
           for mode, token in (("itc", "[CLS]"), ("itm", "[ENC]"), ("caption", "[DEC]"))}
  batches = {mode: processor(images=chips, text=texts["true"], mode=mode) for mode in first}
  for mode, batch in batches.items():
    expected = ref["codec_ids"][:len(rows)].copy()
    expected[:, 0] = first[mode]
    np.testing.assert_array_equal(batch["input_ids"].numpy(), expected, err_msg=f"mode {mode}")
    np.testing.assert_array_equal(batch["attention_mask"].numpy(), expected != tokenizer.pad_token_id)
  print(f"tokenizer: ids identical to the codec's on {len(everything)} captions, all three modes")

  # Images: klip_jax's normalisation, replicated to 3 channels.
  pixels = batches["itc"]["pixel_values"]
  assert pixels.dtype == torch.float32 and pixels.shape == (len(rows), 3) + chips[0].shape, pixels.shape
  close("pixel_values", pixels.numpy(), np.repeat(ref["images"][:, None], 3, axis=1), 1e-5)
  one = pixels[:1]
  same = {"[H, W]": chips[0], "[1, H, W]": chips[0][None],
          "torch [1, 1, H, W]": torch.from_numpy(chips[0][None, None].astype(np.int32)),
          "PIL": Image.open(os.path.join(export, "samples", rows[0]["file"])),
          "3 equal channels": np.repeat(chips[0][None], 3, axis=0),
          "dB": (20 * np.log10(np.maximum(chips[0].astype(np.float32), 1)), "db")}
  for label, image in same.items():
    image, fmt = image if isinstance(image, tuple) else (image, "amplitude")
    got = processor(images=image, input_format=fmt)["pixel_values"]
    close(f"a chip given as {label}", got.numpy(), one.numpy(), 1e-5)
  grey_in_red = np.zeros((3,) + chips[0].shape, np.uint16)
  grey_in_red[0] = chips[0]
  print("refused:", refuses(lambda: processor(images=grey_in_red), "channels differ"))
  print("refused:", refuses(lambda: processor(images=np.stack(chips[:3])), "for 3 chips pass [3, 1, H, W]"))
  print("refused:", refuses(lambda: processor(images=chips[0][:-8, :-8]), "chip: this model takes"))

  # The models on those inputs: what klip_jax computed.
  retrieval = BlipForImageTextRetrieval.from_pretrained(folders["retrieval"]).eval()
  captioning = BlipForConditionalGeneration.from_pretrained(folders["captioning"]).eval()
  close("ITC cosine", retrieval(**batches["itc"], use_itm_head=False).itm_score.numpy(), ref["cosine"], 1e-4)
  close("ITM logits", retrieval(**batches["itm"]).itm_score.numpy(), ref["itm_logits"], 1e-4)
  close("decoder logits", captioning(**batches["caption"]).logits.numpy(), ref["decoder_logits"], 1e-4)
  gen_len = ref["greedy"].shape[1]
  greedy = captioning.generate(pixel_values=pixels, max_length=gen_len, num_beams=1, do_sample=False,
                               suppress_tokens=[int(i) for i in ref["suppress"]])
  greedy = torch.nn.functional.pad(greedy, (0, gen_len - greedy.shape[1]), value=tokenizer.pad_token_id)
  np.testing.assert_array_equal(greedy.numpy(), ref["greedy"], err_msg="greedy captions")
  print(f"greedy captions: token-identical on {len(rows)} chips")

  leaked = sorted(m for m in sys.modules if m == "jax" or m.startswith(("jax.", "klip_jax")))
  assert not leaked, f"the PyTorch side imported {leaked[:5]}"
  print("no jax, no klip_jax imported")


if __name__ == "__main__":
  main(*sys.argv[1:])
