"""The export's processor, tokenizer and sample chips, as a PyTorch user meets them.

The end-to-end test exports a workdir, computes with klip_jax (pipeline normalisation, the
codec, the model) what the user should get on the exported sample chips, and runs
tests/export/hf_user.py in a process that never imports jax or klip_jax to get it again
through AutoProcessor/AutoTokenizer and transformers' BLIP. The other tests check the shipped
image processor against the input pipeline directly.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from klip_jax import config as config_lib
from klip_jax.data import pipeline
from klip_jax.data.tokenizer import TextCodec
from klip_jax.eval import truth
from klip_jax.export import commands, processor
from tests.export import NO_EXPORT

pytest.importorskip("torch", reason=NO_EXPORT)
pytest.importorskip("transformers", reason=NO_EXPORT)

from klip_jax.export.processing_klip import SarImageProcessor  # after the skips: imports torch
from tests.data.text_cases import all_template_captions
from tests.export import parity

GEN_LEN = 10
DB_MEAN, DB_STD = 31.5, 7.25


@pytest.mark.slow
def test_a_pytorch_user_gets_what_klip_jax_computes(tiny_data, tiny_tokenizer, tmp_path):
  config = config_lib.load("configs/tiny.py:48px")  # the test dataset's chips are 48 px
  config.data.update(data_dir=tiny_data, tokenizer=tiny_tokenizer)
  workdir, out, ref = tmp_path / "run", tmp_path / "hf", tmp_path / "reference"
  params, tokens = parity.trained_workdir(config, str(workdir), seed=1, step=7)
  commands.export_workdir(str(workdir), str(out))

  codec = TextCodec(tiny_tokenizer, config.data.max_len)
  split = truth.load_split(tiny_data, processor.SAMPLE_SPLIT, codec, processor.SAMPLE_COUNT)
  assert sorted(os.listdir(out / processor.SAMPLES)) == [f"{i:03d}.png" for i in range(len(split))] + ["captions.jsonl"]
  noisy = [r["caption"] for r in split.records]
  assert noisy != split.captions  # the fixture's noise corrupts some test captions
  more = [c for c, _ in all_template_captions()]
  x = {"images": split.images, "ids": split.text_ids, "pad": split.text_ids != tokens.pad}
  ours = parity.klip_outputs(config, codec.vocab_size, params, x, tokens, GEN_LEN)
  os.makedirs(ref)
  np.savez(ref / "reference.npz", images=split.images[..., 0], cosine=ours["cosine"],
           itm_logits=ours["itm_logits"], decoder_logits=ours["decoder_logits"], greedy=ours["greedy"],
           suppress=np.asarray([tokens.pad, tokens.dec]),  # parity's generate bans these two
           codec_ids=np.stack([codec.encode(c).ids for c in split.captions + noisy + more]))
  (ref / "captions.json").write_text(json.dumps(
      {"true": split.captions, "noisy": noisy, "more": more,
       "decoded": [codec.decode(ids) for ids in split.text_ids]}))

  env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1",
         "PYTHONPATH": ""}
  script = os.path.join(os.path.dirname(__file__), "hf_user.py")
  result = subprocess.run([sys.executable, script, str(out), str(ref)], env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "no jax, no klip_jax imported" in result.stdout
  readme = (out / "retrieval" / "README.md").read_text()
  assert 'AutoProcessor.from_pretrained("retrieval", trust_remote_code=True)' in readme


def _amplitude(dtype, seed=0):
  rng = np.random.default_rng(seed)
  if dtype == np.uint16:
    return rng.integers(0, 4000, (2, 16, 16)).astype(np.uint16)  # zeros included: they count as 1
  chips = rng.gamma(1.0, 300.0, (2, 16, 16)).astype(np.float32)
  chips[0, 3, 4], chips[1, 0, 0] = np.nan, 0.0  # no data -> 0; zero amplitude -> the -100 dB floor
  return chips


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_the_image_processor_normalises_as_the_input_pipeline(dtype):
  chips = _amplitude(dtype)
  expected = np.stack([pipeline.normalise(c, DB_MEAN, DB_STD)[..., 0] for c in chips])
  images = SarImageProcessor(db_mean=DB_MEAN, db_std=DB_STD, image_size=16)
  for given in (chips, chips[:, None], list(chips)):
    pixels = images(given)["pixel_values"]
    assert pixels.shape == (2, 3, 16, 16) and str(pixels.dtype) == "torch.float32"
    for channel in range(3):
      np.testing.assert_allclose(pixels[:, channel].numpy(), expected, atol=1e-6)


def test_the_image_processor_refuses_what_is_not_one_sar_channel():
  images = SarImageProcessor(db_mean=DB_MEAN, db_std=DB_STD, image_size=16)
  chip = _amplitude(np.uint16)[0]
  red = np.zeros((3, 16, 16), np.uint16)
  red[0] = chip
  with pytest.raises(ValueError, match=r"3-channel chip whose channels differ .*Pass the single-channel amplitude"):
    images(red)
  with pytest.raises(ValueError, match=r"a 8x8 chip: this model takes 16x16 chips"):
    images(chip[:8, :8])
  with pytest.raises(ValueError, match=r"input_format='linear'; use one of \('amplitude', 'db'\)"):
    images(chip, input_format="linear")
