"""The exported captioner is the caption fine-tune (`klip finetune caption`), its generate()
follows our decoding rule from generation_config.json alone, config.json says what the model
is, and the model card is written from the workdir's facts.

One workdir (random non-trivial weights, tests/export/parity.py), fine-tuned for a few steps
and exported once into an existing empty folder, serves every test here. References are
independent of the export: the workdir's own config.json and checkpoint read back directly,
our JAX decoder, and transformers.
"""

import json
import math
import os

import numpy as np
import pytest
import yaml

from klip_jax import config as config_lib
from klip_jax.data.tokenizer import TextCodec, TokenIds
from klip_jax.errors import ConfigError, ExportError
from klip_jax.eval import captioning, suite
from klip_jax.eval.runner import ModelRunner
from klip_jax.eval.truth import load_split
from klip_jax.export import commands
from klip_jax.jobs import finetune
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import checkpoint
from tests.export import NO_EXPORT
from tests.xla import optimized_xla

torch = pytest.importorskip("torch", reason=NO_EXPORT)
transformers = pytest.importorskip("transformers", reason=NO_EXPORT)

from tests.export import parity  # noqa: E402  (imports torch: after the skips above)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("captioner")]  # one worker builds `run`
# Enough caption language modelling for greedy decoding to end every test caption with [SEP].
STEPS, LR = 150, 5e-3
# Hand-written benchmark results for the card (not the export's own numbers).
RESULTS = {"step": 7, "tasks": {"retrieval": {"r_mean": 0.25, "chance_r_mean": 0.125, "num_images": 12},
                                "captioning": {"greedy_bleu4": 0.42, "chance_bleu4": 0.3, "finetune_steps": 150}},
           "random_init": {"retrieval": {"r_mean": 0.1}}}


@pytest.fixture(scope="session")
def run(tiny_data, tiny_tokenizer, tmp_path_factory):
  """(config, workdir, export folder, finetune.json) of a fine-tuned, exported workdir. Built
  once per session: a module fixture is rebuilt whenever pytest-xdist runs another module's
  test between this module's (CI built it twice)."""
  config = config_lib.load("configs/tiny.py:48px")
  config.data.update(data_dir=tiny_data, tokenizer=tiny_tokenizer)
  config.eval.update(batch_size=16, beam_size=2)
  workdir = str(tmp_path_factory.mktemp("captioner") / "run")
  parity.trained_workdir(config, workdir, seed=1, step=7)
  with optimized_xla():  # STEPS steps: XLA's optimizations pay for their compile time
    meta = finetune.caption(config, workdir, steps=STEPS, lr=LR)
  os.makedirs(os.path.join(workdir, "eval"))
  with open(os.path.join(workdir, "eval", "results.json"), "w") as f:
    json.dump(RESULTS, f)
  out = str(tmp_path_factory.mktemp("empty_out"))  # exists and is empty, as `mktemp -d` leaves it
  written = commands.export_workdir(workdir, out)
  assert written["captioner"]["source"] == "finetuned"
  return config, workdir, out, meta


def _pixels(images: np.ndarray):
  """Normalised single-channel chips [N, H, W, 1] as the README's grey-replicated RGB tensor."""
  return torch.from_numpy(np.repeat(images.transpose(0, 3, 1, 2), 3, axis=1))


def _jax_runner(config, workdir, codec, params):
  mesh = mesh_lib.from_config(config.mesh)
  graph, state = checkpoint.restore(config, workdir, codec.vocab_size, mesh)
  return ModelRunner(graph, state.params if params is None else params, TokenIds.from_codec(codec), mesh,
                     config.mesh.rules, config.eval.batch_size)


def test_generate_without_arguments_gives_the_fine_tuned_jax_captions(run):
  config, workdir, out, meta = run
  codec = TextCodec(config.data.tokenizer, config.data.max_len)
  tokens = TokenIds.from_codec(codec)
  test = load_split(config.data.data_dir, "test", codec)
  tuned = checkpoint.restore_caption_finetune(config, workdir, codec.vocab_size, mesh_lib.from_config(config.mesh))
  runner = _jax_runner(config, workdir, codec, tuned)
  ours = runner.generate(runner.encode_images(test.images)[0], max_len=codec.max_len, beam_size=1)

  folder = os.path.join(out, "captioning")
  model = transformers.BlipForConditionalGeneration.from_pretrained(folder, trust_remote_code=True)
  plain = transformers.BlipForConditionalGeneration.from_pretrained(folder)
  plain.text_decoder.generation_config = plain.generation_config  # the README's line without remote code
  with torch.no_grad():
    theirs = [m.generate(pixel_values=_pixels(test.images)).numpy() for m in (model, plain)]
  for ids in theirs:
    padded = np.pad(ids, ((0, 0), (0, codec.max_len - ids.shape[1])), constant_values=tokens.pad)
    np.testing.assert_array_equal(padded, ours)
  ids = theirs[0]
  assert any(tokens.sep in row for row in ids), "the fine-tuned captioner never wrote [SEP]"
  for row in ids:
    end = list(row).index(tokens.sep) + 1 if tokens.sep in row else len(row)
    assert row[0] == tokens.dec and (row[end:] == tokens.pad).all()
    assert not np.isin(row[1:end], [tokens.pad, tokens.dec, tokens.cls, tokens.enc, tokens.mask]).any()
  # The captions `klip finetune caption` reported (and `klip eval` shows) are these.
  with open(os.path.join(workdir, "caption_finetune", "captions_test.jsonl")) as f:
    reported = [json.loads(line)["greedy"] for line in f]
  assert [codec.decode(row) for row in ids] == reported
  assert meta["source_step"] == 7 and meta["steps"] == STEPS and meta["lr"] == LR
  assert meta["metrics"]["num_images"] == len(test) and 0 <= meta["metrics"]["greedy_bleu4"] <= 1


def test_config_says_what_the_model_is(run):
  config, workdir, out, _ = run
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)  # the run's own config, read without klip_jax
  model, vision, text = saved["model"], saved["model"]["vision"], saved["model"]["text"]
  codec = TextCodec(saved["data"]["tokenizer"], saved["data"]["max_len"])
  tokens = TokenIds.from_codec(codec)
  mesh = mesh_lib.from_config(config.mesh)
  _, state = checkpoint.restore(config, workdir, codec.vocab_size, mesh)
  temperature = float(np.clip(np.asarray(state.params["temp"].value), *model["temp_range"]))
  for name in ("retrieval", "captioning"):
    blip = transformers.BlipConfig.from_pretrained(os.path.join(out, name))
    v, t = blip.vision_config, blip.text_config
    assert math.isclose(blip.logit_scale_init_value, math.log(1 / temperature), rel_tol=1e-6)
    assert blip.image_text_hidden_size == blip.projection_dim == model["embed_dim"]
    assert v.projection_dim == t.projection_dim == model["embed_dim"]
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (
        vision["width"], vision["depth"], vision["heads"], vision["mlp_dim"])
    assert (v.image_size, v.patch_size, v.layer_norm_eps, v.hidden_act) == (
        vision["image_size"], vision["patch_size"], vision["ln_eps"], "gelu")
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size, t.encoder_hidden_size) == (
        text["width"], text["depth"], text["heads"], text["mlp_dim"], vision["width"])
    assert (t.layer_norm_eps, t.hidden_act, t.max_position_embeddings, t.vocab_size) == (
        text["ln_eps"], "gelu", text["max_len"], codec.vocab_size)
    assert (t.bos_token_id, t.eos_token_id, t.sep_token_id, t.pad_token_id) == (
        codec.dec_id, codec.sep_id, codec.sep_id, codec.pad_id)
    assert (v.initializer_range, t.initializer_range) == (vision["init_std"], text["init_std"])
    assert v.attention_dropout == t.hidden_dropout_prob == t.attention_probs_dropout_prob == t.label_smoothing == 0
    assert blip.klip_jax["step"] == 7
  assert blip.klip_jax["captioner"] == "finetuned"
  generation = transformers.GenerationConfig.from_pretrained(os.path.join(out, "captioning"))
  assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (
      codec.dec_id, codec.sep_id, codec.pad_id)
  assert (generation.max_length, generation.num_beams, generation.do_sample) == (saved["data"]["max_len"], 1, False)
  assert sorted(generation.suppress_tokens) == sorted(
      {codec.pad_id, codec.dec_id, codec.cls_id, codec.enc_id, codec.mask_id})

  # exp(logit_scale) * HF cosine == our ITC logits (cosine / temperature) on test pairs.
  test = load_split(config.data.data_dir, "test", codec, 4)
  runner = _jax_runner(config, workdir, codec, None)
  ours = runner.encode_images(test.images)[1] @ runner.encode_texts(test.text_ids).T / temperature
  retrieval = transformers.BlipForImageTextRetrieval.from_pretrained(os.path.join(out, "retrieval"))
  ids = torch.from_numpy(test.text_ids).long()
  with torch.no_grad():
    cosine = retrieval(input_ids=ids, attention_mask=(ids != tokens.pad).long(), pixel_values=_pixels(test.images),
                       use_itm_head=False).itm_score
  theirs = math.exp(blip.logit_scale_init_value) * cosine.numpy()
  # Equal to float32 rounding of the cosines (1e-6), which the logits scale by 1 / temperature.
  np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6 / temperature)


def test_model_card_is_written_from_the_workdir(run):
  _, _, out, meta = run
  for name in ("README.md", "retrieval/README.md", "captioning/README.md"):
    with open(os.path.join(out, name)) as f:
      text = f.read()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "transformers" and "license" in front and front["datasets"]
    assert front["pipeline_tag"] in ("image-to-text", "zero-shot-image-classification")
    assert front["metrics"] == {"README.md": ["bleu", "cider", "recall"], "retrieval/README.md": ["recall"],
                                "captioning/README.md": ["bleu", "cider"]}[name]
  with open(os.path.join(out, "README.md")) as f:
    card = f.read()
  assert "| retrieval | r_mean | 0.250 | 0.100 | 0.125 |" in card
  assert "| captioning | greedy_bleu4 | 0.420 |  | 0.300 |" in card
  assert "truth.true_keywords" in card and "16-bit" in card
  assert f"{meta['steps']} steps of caption language modelling" in card
  with open(os.path.join(out, "captioning", "README.md")) as f:
    readme = f.read()
  assert "suppress_tokens=[PAD, DEC]" not in readme and "trust_remote_code=True" in readme


def test_the_captioner_choice_and_a_stale_fine_tune(run, tmp_path, caplog):
  config, workdir, _, meta = run
  again = finetune.caption(config, workdir, steps=STEPS, lr=LR)
  assert again["skipped"] and again["metrics"] == meta["metrics"]
  lm_bias = "text_decoder.cls.predictions.bias"
  exported = {}
  for choice in ("pretrain", "finetuned"):
    written = commands.export_workdir(workdir, str(tmp_path / choice), captioner=choice)
    assert written["captioner"]["source"] == choice
    exported[choice] = transformers.BlipForConditionalGeneration.from_pretrained(
        str(tmp_path / choice / "captioning")).state_dict()[lm_bias].numpy()
  codec = TextCodec(config.data.tokenizer, config.data.max_len)
  mesh = mesh_lib.from_config(config.mesh)
  _, state = checkpoint.restore(config, workdir, codec.vocab_size, mesh)
  tuned = checkpoint.restore_caption_finetune(config, workdir, codec.vocab_size, mesh)
  np.testing.assert_array_equal(exported["pretrain"], np.asarray(state.params["text"]["lm_head"]["bias"].value))
  np.testing.assert_array_equal(exported["finetuned"], np.asarray(tuned["text"]["lm_head"]["bias"].value))

  path = os.path.join(workdir, "caption_finetune", "finetune.json")
  with open(path) as f:
    original = f.read()
  try:
    with open(path, "w") as f:
      json.dump({**meta, "source_step": 3}, f)
    with pytest.raises(ExportError, match=r"made from checkpoint step 3, not the exported step 7.*--rebuild"):
      commands.export_workdir(workdir, str(tmp_path / "refused"), captioner="finetuned")
    assert not os.path.exists(tmp_path / "refused")
    written = commands.export_workdir(workdir, str(tmp_path / "fallback"))
    assert written["captioner"]["source"] == "pretrain" and "step 3" in written["captioner"]["note"]
    assert any("only to reconstruct masked keywords" in r.message for r in caplog.records)
    with pytest.raises(ConfigError, match="--rebuild"):
      finetune.caption(config, workdir, steps=STEPS, lr=LR)
  finally:
    with open(path, "w") as f:
      f.write(original)


def test_eval_scores_the_saved_fine_tune_instead_of_fine_tuning_again(run, monkeypatch):
  config, workdir, _, meta = run

  def refuse(*args, **kwargs):
    raise AssertionError("klip eval fine-tuned again although the workdir has a fine-tune of this step")

  monkeypatch.setattr(captioning, "finetune", refuse)
  config = config.copy_and_resolve_references()
  config.eval.update(tasks="captioning", random_baseline=False)
  results = suite.run(config, workdir)
  scores = results["tasks"]["captioning"]
  assert scores["finetune_saved"] == 1.0 and scores["finetune_steps"] == STEPS
  assert {k: v for k, v in scores.items() if k not in ("finetune_saved", "finetune_steps")} == meta["metrics"]
