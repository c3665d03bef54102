"""SentencePiece model and text codec: special tokens, keyword positions, clause ids."""

import pickle

import numpy as np
import pytest

from klip_jax.data import knowledge, tokenizer
from klip_jax.errors import TokenizerError
from tests.data.text_cases import EXAMPLE_KEYWORDS, all_template_captions


@pytest.fixture(scope="module")
def codec(tiny_tokenizer):
  return tokenizer.TextCodec(tiny_tokenizer, max_len=128)


def test_special_tokens_are_distinct_single_pieces(codec):
  specials = [codec.pad_id, codec.dec_id, codec.sep_id, codec.cls_id, codec.enc_id, codec.mask_id]
  assert codec.pad_id == 0 and len(set(specials)) == len(specials)
  assert [codec.sp.id_to_piece(i) for i in specials] == ["[PAD]", "[DEC]", "[SEP]", "[CLS]", "[ENC]", "[MASK]"]
  assert codec.sp.encode("a$b", out_type=str).count("$") == 1


def test_every_template_keyword_maps_to_its_token_positions(codec):
  for caption, spans in all_template_captions():
    encoded = codec.encode(caption, spans)
    assert encoded.ids[0] == codec.cls_id
    scene_type = "target" if caption.count("targets") else "landform"
    for clause, ((a, b), keyword) in enumerate(zip(spans, EXAMPLE_KEYWORDS[scene_type])):
      positions = np.flatnonzero((encoded.keyword_mask == 1) & (encoded.clause_ids == clause))
      assert len(positions) and np.all(np.diff(positions) == 1), (caption, clause)
      decoded = codec.sp.decode([int(i) for i in encoded.ids[positions]])
      assert decoded.strip() == keyword == caption[a:b]


def test_clause_ids_follow_the_separators(codec):
  caption, spans = all_template_captions()[0]
  encoded = codec.encode(caption, spans)
  real = encoded.ids != codec.pad_id
  ids = encoded.clause_ids[real][1:-1]  # drop [CLS] and [SEP]
  assert ids[0] == 0 and ids[-1] == 7 and np.all(np.diff(ids) >= 0)
  separators = encoded.ids[real][1:-1] == codec.separator_id
  assert separators.sum() == 7
  assert encoded.clause_ids[0] == -1 and encoded.clause_ids[-1] == -1


def test_decode_inverts_encode(codec):
  for caption, spans in all_template_captions():
    assert codec.decode(codec.encode(caption, spans).ids) == caption


def test_truncation_keeps_cls_and_sep(tiny_tokenizer):
  short = tokenizer.TextCodec(tiny_tokenizer, max_len=10)
  caption, spans = all_template_captions()[0]
  encoded = short.encode(caption, spans)
  assert encoded.ids[0] == short.cls_id and encoded.ids[-1] == short.sep_id
  assert (encoded.ids != short.pad_id).all()


def test_codec_pickles_for_grain_workers(codec):
  caption, spans = all_template_captions()[1]
  clone = pickle.loads(pickle.dumps(codec))
  assert np.array_equal(clone.encode(caption, spans).ids, codec.encode(caption, spans).ids)


def test_training_is_deterministic(tmp_path):
  captions = [c for c, _ in all_template_captions()] * 3
  tokenizer.train_sentencepiece(captions, 200, tmp_path / "a.model")
  tokenizer.train_sentencepiece(captions, 200, tmp_path / "b.model")
  assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()


def test_bad_inputs_raise_tokenizer_errors(tmp_path):
  with pytest.raises(TokenizerError, match="klip data tokenizer"):
    tokenizer.TextCodec(tmp_path / "missing.model", 16)
  with pytest.raises(TokenizerError, match="vocab-size"):
    tokenizer.train_sentencepiece(["abc def ghi$jkl"], 5, tmp_path / "c.model")
  assert not (tmp_path / "c.model").exists()


def test_a_directory_or_a_file_that_is_no_sentencepiece_model_is_a_tokenizer_error(tmp_path):
  # --config.data.tokenizer at a folder gave a raw IsADirectoryError; at any other file, a raw
  # RuntimeError from sentencepiece's protobuf parser (or, for an empty file, a codec of 0 pieces).
  (tmp_path / "folder").mkdir()
  with pytest.raises(TokenizerError, match=r"folder is a directory, not a sentencepiece \.model file; .*"
                                           "klip data tokenizer --data DIR"):
    tokenizer.TextCodec(tmp_path / "folder", 16)
  for name, content in (("garbage.model", b"garbage\n"), ("empty.model", b"")):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TokenizerError, match=rf"{name} is not a sentencepiece \.model file .*"
                                             "klip data tokenizer --data DIR"):
      tokenizer.TextCodec(str(tmp_path / name), 16)


def test_non_ascii_keyword_offsets(codec):
  caption, spans = knowledge.verbalise("target", EXAMPLE_KEYWORDS["target"], [1] * 8)
  encoded = codec.encode(caption, spans)
  positions = np.flatnonzero((encoded.keyword_mask == 1) & (encoded.clause_ids == 6))
  assert codec.sp.decode([int(i) for i in encoded.ids[positions]]).strip() == "são paulo, brazil"


def test_keyword_pieces_skip_runs_of_whitespace_before_a_keyword(codec):
  # Tabs and runs of spaces make sentencepiece emit pieces that are only whitespace, or that
  # start with it: such a piece is a keyword piece only if its text, not its leading
  # whitespace, reaches into the span (the second span ends in a space: the " " piece after
  # "none" is not part of the keyword).
  caption = "the  water is\t\tcalm river $ roads:    none \t"
  spans = [(caption.index("calm river"), caption.index("calm river") + len("calm river")),
           (caption.index("none"), caption.index("none") + len("none "))]
  ids, keyword, clause = codec.pieces(caption, spans)
  pieces = codec.sp.encode(caption, return_type="proto").pieces
  assert [piece.id for piece in pieces] == ids
  texts = [piece.surface for piece in pieces]
  flagged = [(t.strip(), c) for t, k, c in zip(texts, keyword, clause) if k]
  assert "".join(t for t, c in flagged if c == 0) == "calmriver"
  assert "".join(t for t, c in flagged if c == 1) == "none"
  assert all(t.strip() for t, k in zip(texts, keyword) if k)
  separator = texts.index(next(t for t in texts if "$" in t))
  assert set(clause[:separator]) == {0} and set(clause[separator + 1:]) == {1}
