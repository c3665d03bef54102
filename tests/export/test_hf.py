"""Hugging Face BLIP export/import: parity against transformers (the independent reference).

Both directions start from non-trivial random weights (init_std 0.1 in the tiny config, random
biases and LayerNorm scales) so a wrong mapping cannot pass by accident. "Base shapes" tests use
configs/base.py's widths, heads, image size and position table but, to stay fast on CPU, fp32,
ONE layer per tower and a 300-token vocabulary. Max abs differences are logged at INFO: run
`pytest tests/export -o log_cli=true --log-cli-level=INFO` to see them.
"""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from klip_jax import config as config_lib
from klip_jax.data import prepare
from klip_jax.data.tokenizer import TextCodec, TokenIds
from klip_jax.errors import ConfigError, ExportError
from klip_jax.export import commands, hf, processor
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import checkpoint
from klip_jax.train import state as state_lib
from tests.export import NO_EXPORT

# torch and transformers come with the optional export extra; the test extra installs it, so CI
# always runs these. A JAX-only install (pip install -e .) skips them instead of failing to import.

torch = pytest.importorskip("torch", reason=NO_EXPORT)
transformers = pytest.importorskip("transformers", reason=NO_EXPORT)

from tests.export import parity  # noqa: E402  (imports torch: after the skips above)

pytestmark = pytest.mark.slow  # parity runs PyTorch next to XLA

GEN_LEN = 10
TIED = {"text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"}
HF_CLASSES = {"retrieval": transformers.BlipForImageTextRetrieval,
              "captioning": transformers.BlipForConditionalGeneration}
ENTRIES = {"retrieval": hf.retrieval_entries, "captioning": hf.captioning_entries}


@pytest.fixture
def tiny(tiny_data, tiny_tokenizer):
  config = config_lib.load("configs/tiny.py")
  config.data.update(data_dir=tiny_data, tokenizer=tiny_tokenizer)
  return config


def _base_shapes():
  config = config_lib.load("configs/base.py")
  config.model.dtype = "float32"
  config.model.vision.depth = config.model.text.depth = 1
  return config, 300


def _hf_from_klip(config, vocab, params):
  """transformers models holding klip_jax `params`, through the export mapping."""
  flat = hf.flatten(params, config.model)
  blip = hf.blip_config(config.model, vocab, parity.TOKENS)
  models = {}
  for name, cls in HF_CLASSES.items():
    model = cls(blip).eval()
    tensors = {k: torch.from_numpy(v) for k, v in hf.to_hf(flat, ENTRIES[name](config.model)).items()}
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= TIED, result
    models[name] = model
  return models


def _random_hf(config, vocab, seed, *, shared_decoder):
  """Random transformers BLIP models; with `shared_decoder` the captioning decoder shares all
  but its self-attention with the retrieval text encoder, as a BLIP-pretrained pair does."""
  blip = hf.blip_config(config.model, vocab, parity.TOKENS)
  torch.manual_seed(seed)
  models = {name: cls(blip).eval() for name, cls in HF_CLASSES.items()}
  for i, model in enumerate(models.values()):
    parity.perturb_torch(model, seed + i)
  retrieval, captioning = models["retrieval"], models["captioning"]
  captioning.vision_model.load_state_dict(retrieval.vision_model.state_dict())
  if shared_decoder:
    encoder = {k: v for k, v in retrieval.text_encoder.state_dict().items() if ".attention." not in k}
    result = captioning.text_decoder.bert.load_state_dict(encoder, strict=False)
    assert all(".attention." in k or k.endswith("position_ids") for k in result.missing_keys)
  return models


def _checkpoints(models):
  return [hf.Checkpoint(name, model.config, {k: v.numpy() for k, v in model.state_dict().items()})
          for name, model in models.items()]


def _klip_from_hf(config, vocab, models):
  template = parity.random_params(config, vocab, seed=99)
  plan = hf.import_plan(config.model, _checkpoints(models))
  flat, report = hf.from_hf(plan, hf.flatten(template, config.model))
  return hf.unflatten(flat, template, config.model), report


def _compare(config, vocab, klip_params, models, label, tokens=parity.TOKENS):
  x = parity.inputs(config, vocab, tokens, seed=5)
  ours = parity.klip_outputs(config, vocab, klip_params, x, tokens, GEN_LEN)
  theirs = parity.hf_outputs(models["retrieval"], models["captioning"], x, tokens, GEN_LEN)
  return parity.assert_parity(ours, theirs, label)


def test_export_workdir_loads_in_transformers_and_matches(tiny, tmp_path):
  workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
  params, tokens = parity.trained_workdir(tiny, workdir, seed=1, step=7)
  vocab = TextCodec(tiny.data.tokenizer, 8).vocab_size

  written = commands.export_workdir(workdir, out)  # the config comes from workdir/config.json

  assert written["step"] == 7
  assert sorted(os.listdir(out)) == ["README.md", "captioning", "example.py", "retrieval", "samples"]
  models = {}
  for name, cls in HF_CLASSES.items():
    folder = os.path.join(out, name)
    assert {"model.safetensors", "config.json", "tokenizer.model", "README.md"} <= set(os.listdir(folder))
    models[name], info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert TextCodec(os.path.join(folder, "tokenizer.model"), 8).vocab_size == vocab
    with open(os.path.join(folder, "README.md")) as f:
      readme = f.read()
    assert f"PAD, DEC, SEP, CLS, ENC = {tokens.pad}, {tokens.dec}, {tokens.sep}, {tokens.cls}, {tokens.enc}" in readme
  text = models["captioning"].config.text_config
  assert (text.bos_token_id, text.sep_token_id, text.pad_token_id) == (tokens.dec, tokens.sep, tokens.pad)
  _compare(tiny, vocab, params, models, "export tiny", tokens)


def _save_hf(models, folder, tokenizer: str | None) -> None:
  """`models` saved as an export lays them out, each folder with the sentencepiece model
  `tokenizer` (a path; None: no tokenizer file, as a bare save_pretrained leaves)."""
  for name, model in models.items():
    model.save_pretrained(str(folder / name))
    if tokenizer is not None:
      shutil.copyfile(tokenizer, folder / name / commands.SP_MODEL)


@pytest.fixture(scope="module")
def other_tokenizer(tiny_data, tmp_path_factory) -> str:
  """A sentencepiece model of the tiny tokenizer's size trained on other captions (the train
  split's alone), so most ids are another piece: what a workdir trains for itself."""
  path = str(tmp_path_factory.mktemp("other_tok") / "tok.model")
  prepare.train_tokenizer(tiny_data, 1000, path)
  return path


def test_import_hf_initialises_a_workdir_that_matches(tiny, tmp_path):
  codec = TextCodec(tiny.data.tokenizer, tiny.data.max_len)
  tokens = TokenIds.from_codec(codec)
  models = _random_hf(tiny, codec.vocab_size, seed=4, shared_decoder=True)
  _save_hf(models, tmp_path / "hf", tiny.data.tokenizer)  # the run's tokenizer: embeddings imported

  result = commands.import_hf(str(tmp_path / "hf"), tiny, str(tmp_path / "run"))

  assert result["not_imported"] == {"temp": "no BLIP counterpart"}
  assert any("summed to one channel" in note for note in result["adapted"])
  with open(tmp_path / "run" / "config.json") as f:
    assert json.load(f)["model"] == json.loads(tiny.to_json_best_effort())["model"]
  # Read back the way klip train does when it starts from imported weights.
  tx, _ = state_lib.make_optimizer(tiny.optim, tiny.train.steps)
  mesh = mesh_lib.make_mesh(tiny.mesh.shape)
  _, abstract, shardings = state_lib.abstract_state(tiny, codec.vocab_size, tx, mesh)
  params = checkpoint.restore_params(result["init_params"], abstract.params, shardings.params)
  _compare(tiny, codec.vocab_size, jax.device_get(params.to_pure_dict()), models, "import tiny", tokens)


def test_export_to_and_import_from_gcs(tiny, tmp_path, fake_gcs):
  """An export to gs:// (written locally, since safetensors and save_pretrained take local
  paths, then uploaded) holds the bytes of a local export, and import-hf reads it back from
  the bucket into the parameters a local import gives."""
  workdir = str(tmp_path / "run")
  parity.trained_workdir(tiny, workdir, seed=1, step=7)
  vocab = TextCodec(tiny.data.tokenizer, 8).vocab_size
  commands.export_workdir(workdir, str(tmp_path / "hf"))
  commands.export_workdir(workdir, str(tmp_path / "hf"))  # an earlier export is replaced
  written = commands.export_workdir(workdir, "gs://bucket/hf")
  assert written["retrieval"]["path"] == "gs://bucket/hf/retrieval"
  local = {p.relative_to(tmp_path / "hf").as_posix(): p.read_bytes()
           for p in (tmp_path / "hf").rglob("*") if p.is_file()}
  assert {name.removeprefix("bucket/hf/"): data for name, data in fake_gcs.items()} == local

  tx, _ = state_lib.make_optimizer(tiny.optim, tiny.train.steps)
  _, abstract, shardings = state_lib.abstract_state(tiny, vocab, tx, mesh_lib.make_mesh(tiny.mesh.shape))
  imported = []
  for source, target in (("gs://bucket/hf", "from_gcs"), (str(tmp_path / "hf"), "from_disk")):
    result = commands.import_hf(source, tiny, str(tmp_path / target))
    params = checkpoint.restore_params(result["init_params"], abstract.params, shardings.params)
    imported.append((result["imported"], result["not_imported"], jax.device_get(params.to_pure_dict())))
  (n_gcs, skipped_gcs, gcs), (n_disk, skipped_disk, disk) = imported
  assert n_gcs == n_disk > 0 and skipped_gcs == skipped_disk
  jax.tree.map(np.testing.assert_array_equal, gcs, disk)


def test_import_hf_takes_the_exported_tokenizer_and_refuses_a_second_import(tiny, tiny_tokenizer, other_tokenizer,
                                                                           tmp_path):
  """Without --config.data.tokenizer the run's tokenizer is the one the folder ships (its
  embeddings' rows are that tokenizer's pieces), not one trained afresh on the run's data (here
  `other_tokenizer`, of the same size). A second import into the workdir stops before any work."""
  tiny.data.tokenizer = ""
  models = _random_hf(tiny, TextCodec(tiny_tokenizer, 8).vocab_size, seed=11, shared_decoder=True)
  _save_hf(models, tmp_path / "hf", tiny_tokenizer)
  workdir = tmp_path / "run"

  result = commands.import_hf(str(tmp_path / "hf"), tiny, str(workdir))

  with open(tiny_tokenizer, "rb") as f:
    assert (workdir / "tokenizer.model").read_bytes() == f.read()
  assert result["not_imported"] == {"temp": "no BLIP counterpart"}  # word embeddings and LM head included
  with open(other_tokenizer, "rb") as f:  # what the run would have trained: same size, other pieces
    assert (workdir / "tokenizer.model").read_bytes() != f.read()
  assert TextCodec(other_tokenizer, 8).vocab_size == TextCodec(tiny_tokenizer, 8).vocab_size

  before = sorted(os.listdir(workdir))
  with pytest.raises(ExportError, match=r"run/init_params already exists.*new --workdir, or remove .*init_params"):
    commands.import_hf(str(tmp_path / "hf"), tiny, str(workdir))
  assert sorted(os.listdir(workdir)) == before


def test_import_hf_leaves_out_embeddings_of_another_tokenizer(tiny, other_tokenizer, tmp_path):
  """A folder shipping another tokenizer of the same size keeps the fresh word embeddings and
  LM-head bias (most ids are another piece there); the tokenizer the user named stays the run's."""
  vocab = TextCodec(tiny.data.tokenizer, 8).vocab_size
  models = _random_hf(tiny, vocab, seed=12, shared_decoder=True)
  _save_hf(models, tmp_path / "hf", other_tokenizer)

  result = commands.import_hf(str(tmp_path / "hf"), tiny, str(tmp_path / "run"))

  skipped = {"text/word_embed/embedding", "text/lm_head/bias"}
  assert set(result["not_imported"]) == skipped | {"temp"}
  for k in skipped:
    assert result["not_imported"][k].startswith("tokenizer differs: ")
    assert tiny.data.tokenizer in result["not_imported"][k]
  assert not os.path.exists(tmp_path / "run" / "tokenizer.model")
  tx, _ = state_lib.make_optimizer(tiny.optim, tiny.train.steps)
  _, abstract, shardings = state_lib.abstract_state(tiny, vocab, tx, mesh_lib.make_mesh(tiny.mesh.shape))
  params = checkpoint.restore_params(result["init_params"], abstract.params, shardings.params)
  embedding = np.asarray(jax.device_get(params.to_pure_dict())["text"]["word_embed"]["embedding"])
  hf_embedding = models["retrieval"].text_encoder.embeddings.word_embeddings.weight.detach().numpy()
  assert embedding.shape == hf_embedding.shape and not np.allclose(embedding, hf_embedding)


def test_vocabulary_check_reads_each_kind_of_tokenizer(tiny_tokenizer, other_tokenizer, tmp_path):
  """The pieces come from an export's tokenizer.model or tokenizer.json, or a BERT vocab.txt (a
  Salesforce BLIP checkpoint's); a folder without any of them cannot vouch for its rows."""
  codec = TextCodec(tiny_tokenizer, 8)
  check = {}
  for name, write in {
      "sentencepiece": lambda f: shutil.copyfile(tiny_tokenizer, f / commands.SP_MODEL),
      "other": lambda f: shutil.copyfile(other_tokenizer, f / commands.SP_MODEL),
      "tokenizer.json": lambda f: processor.tokenizer(codec, 8).save_pretrained(str(f)),
      "bert": lambda f: (f / "vocab.txt").write_text("[PAD]\n[unused0]\n[CLS]\nthe\n##s\n"),
      "none": lambda f: None}.items():
    (tmp_path / name).mkdir()
    write(tmp_path / name)
    vocabulary = commands._read_vocabulary(str(tmp_path / name))
    check[name] = commands._vocab_mismatch(vocabulary, codec, "tok.model")
  assert check["sentencepiece"] is None and check["tokenizer.json"] is None
  assert check["other"].startswith("tokenizer differs: ") and "1000 pieces, tok.model 1000" in check["other"]
  assert "has 5 pieces, tok.model 1000, and only 1 ids" in check["bert"]  # [PAD] is id 0 in both
  assert "ships no tokenizer" in check["none"]


def test_other_layouts_export_and_import(tiny):
  # A separate decoder, split q/k/v vision attention, scanned towers, tanh GELU, other epsilons:
  # all expressed through the HF config or a layout change, never by editing numbers.
  tiny.model.share_decoder = False
  tiny.model.vision.update(fused_qkv=False, scan_layers=True, approximate_gelu=True, ln_eps=1e-6)
  tiny.model.text.update(scan_layers=True, approximate_gelu=True, ln_eps=1e-7)
  params = parity.random_params(tiny, 64, seed=2)
  models = _hf_from_klip(tiny, 64, params)
  assert models["captioning"].config.vision_config.hidden_act == "gelu_pytorch_tanh"
  _compare(tiny, 64, params, models, "export tiny (separate decoder, split qkv, scan, tanh)")
  models = _random_hf(tiny, 64, seed=6, shared_decoder=False)
  params, report = _klip_from_hf(tiny, 64, models)
  assert set(report.not_imported) == {"temp", "text/lm_head/transform/kernel", "text/lm_head/transform/bias",
                                      "text/lm_head/norm/scale", "text/lm_head/norm/bias", "text/lm_head/bias"}
  _compare(tiny, 64, params, models, "import tiny (separate decoder, split qkv, scan, tanh)")


def test_base_shapes_export_and_import():
  config, vocab = _base_shapes()
  params = parity.random_params(config, vocab, seed=3)
  _compare(config, vocab, params, _hf_from_klip(config, vocab, params), "export base shapes")
  models = _random_hf(config, vocab, seed=7, shared_decoder=True)
  params, _ = _klip_from_hf(config, vocab, models)
  _compare(config, vocab, params, models, "import base shapes")


def test_import_keeps_fresh_embeddings_for_another_vocabulary(tiny):
  models = _random_hf(tiny, 80, seed=8, shared_decoder=True)
  template = parity.random_params(tiny, 64, seed=9)
  plan = hf.import_plan(tiny.model, _checkpoints(models))
  flat, report = hf.from_hf(plan, hf.flatten(template, tiny.model))
  skipped = {"text/word_embed/embedding", "text/lm_head/bias"}
  assert set(report.not_imported) == skipped | {"temp"}
  assert all("vocabulary differs" in report.not_imported[k] for k in skipped)
  for k in skipped:
    np.testing.assert_array_equal(flat[k], hf.flatten(template, tiny.model)[k])


def test_import_from_another_image_size_and_rgb(tiny):
  # The checkpoint is 48 px (6x6 patches), the config 32 px (4x4): positions are interpolated
  # and the RGB patch kernel becomes one channel that sees a grey image as RGB does.
  config_48 = config_lib.load("configs/tiny.py")
  config_48.model.vision.image_size = 48
  models = _random_hf(config_48, 64, seed=10, shared_decoder=True)
  params, report = _klip_from_hf(tiny, 64, models)
  pos = params["vision"]["pos_embed"]
  assert pos.shape == (1, 17, 64)
  hf_pos = models["retrieval"].vision_model.embeddings.position_embedding.detach().numpy()
  np.testing.assert_array_equal(pos[:, 0], hf_pos[:, 0])
  assert any("6x6 -> 4x4" in note for note in report.adapted)
  model, _ = parity.klip_model(tiny, 64, params)
  grey = np.random.default_rng(0).standard_normal((2, 32, 32, 1)).astype(np.float32)
  ours = np.asarray(model.vision.patch_embed(grey)).reshape(2, 16, 64)
  with torch.no_grad():
    rgb = torch.from_numpy(np.repeat(grey.transpose(0, 3, 1, 2), 3, axis=1))
    theirs = models["retrieval"].vision_model.embeddings.patch_embedding(rgb).flatten(2).transpose(1, 2)
  np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4)


def test_a_mismatched_width_names_the_config_field(tiny, tmp_path):
  other = config_lib.load("configs/tiny.py")
  other.model.text.update(width=96, heads=3)
  blip = hf.blip_config(other.model, 64, parity.TOKENS)
  transformers.BlipForImageTextRetrieval(blip).save_pretrained(str(tmp_path / "hf"))
  with pytest.raises(ConfigError, match=r"config\.model\.text\.width=64 .*text_config\.hidden_size=96"):
    commands.import_hf(str(tmp_path / "hf"), tiny, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_missing_export_dependencies_say_how_to_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "transformers", None)
  with pytest.raises(ExportError, match=r"pip install -e '\.\[export\]'"):
    commands.export_workdir(str(tmp_path), str(tmp_path / "out"))


def test_export_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
  (tmp_path / "notes.txt").write_text("keep me")
  with pytest.raises(ExportError, match="not an earlier export"):
    commands.export_workdir(str(tmp_path / "run"), str(tmp_path))
  assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_export_refuses_a_folder_of_export_names_it_did_not_write(tmp_path):
  """A user's folder holding only names an export has (a README.md, a retrieval/ of their own)
  is not an earlier export: it lacks the klip_jax entry exported config.json files carry."""
  project = tmp_path / "project"
  (project / "retrieval").mkdir(parents=True)
  (project / "README.md").write_text("notes")
  (project / "retrieval" / "config.json").write_text('{"model_type": "blip"}')
  with pytest.raises(ExportError, match=r"project is not empty and is not an earlier export.*new or empty --out"):
    commands.export_workdir(str(tmp_path / "run"), str(project))
  assert (project / "README.md").read_text() == "notes"
  (project / "retrieval" / "config.json").unlink()
  (project / "retrieval").rmdir()
  with pytest.raises(ExportError, match="not an earlier export"):
    commands.export_workdir(str(tmp_path / "run"), str(project))
  assert (project / "README.md").read_text() == "notes"
