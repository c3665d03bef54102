"""A workdir's checkpoints continue only with the tokenizer they were trained with."""

import json

import pytest

from klip_jax.data import tokenizer
from klip_jax.errors import ConfigError
from klip_jax.train import checkpoint
from tests.data.text_cases import all_template_captions


def test_a_resume_with_another_tokenizer_is_refused_and_names_the_setting(tmp_path, tiny_tokenizer):
  own = tokenizer.TextCodec(tiny_tokenizer, 96)
  other_path = tmp_path / "other.model"
  tokenizer.train_sentencepiece([c for c, _ in all_template_captions()], 300, other_path)
  other = tokenizer.TextCodec(str(other_path), 96)
  assert other.vocab_size != own.vocab_size
  workdir = str(tmp_path / "run")
  checkpoint.check_tokenizer(workdir, other)  # no record (a fresh run, or one from before it): nothing to check
  checkpoint.record_tokenizer(workdir, own)
  record = json.loads((tmp_path / "run" / "tokenizer_fingerprint.json").read_text())
  assert record["pieces"] == own.vocab_size and len(record["sha256"]) == 64
  checkpoint.check_tokenizer(workdir, tokenizer.TextCodec(tiny_tokenizer, 64))  # the same model: fine
  with pytest.raises(ConfigError, match=rf"another tokenizer \({own.vocab_size} pieces.*\({other.vocab_size} pieces"
                                        r".*--config\.data\.tokenizer"):
    checkpoint.check_tokenizer(workdir, other)
