"""SentencePiece training on captions, and the text codec used by every model input.

The vocabulary reserves BLIP's special tokens: [PAD] (0), [UNK], [DEC] (the decoder's first
token, also sentencepiece's bos), [SEP] (eos), [CLS] (unimodal encoder), [ENC]
(image-grounded encoder) and [MASK]; "$", the clause separator, is always its own piece.

The codec encodes a caption to a fixed length together with, per token, whether it belongs to
a clause's keyword and which clause it belongs to. Keyword membership comes from the
character offsets sentencepiece reports for each piece, so it is exact for any text, not just
for our templates: a token is a keyword token when its characters (ignoring the whitespace a
piece absorbs) overlap a keyword span.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from io import BytesIO

import numpy as np
import sentencepiece as spm

from klip_jax import io
from klip_jax.data.knowledge import SEPARATOR
from klip_jax.errors import TokenizerError

_ASCII_SPACE = np.array([chr(i).isspace() for i in range(128)])  # code point -> is it a space

PAD, UNK, DEC, SEP = "[PAD]", "[UNK]", "[DEC]", "[SEP]"
CLS, ENC, MASK = "[CLS]", "[ENC]", "[MASK]"
# How a user makes a tokenizer, for the messages that ask for one (`klip data tokenizer`, cli.py).
MAKE_ONE = "klip data tokenizer --data DIR --vocab-size V --out FILE"


def train_sentencepiece(captions: Iterable[str], vocab_size: int, out_path: str | os.PathLike) -> None:
  """Train a unigram SentencePiece model on `captions` and write it to `out_path` atomically.

  `vocab_size` is an upper bound: template captions hold fewer distinct pieces than a real
  corpus, and the model takes its vocabulary size from the trained tokenizer.
  """
  buffer = BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=buffer, vocab_size=vocab_size,
        hard_vocab_limit=False, model_type="bpe", character_coverage=1.0, normalization_rule_name="identity",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=PAD, unk_piece=UNK, bos_piece=DEC,
        eos_piece=SEP, control_symbols=[CLS, ENC, MASK], user_defined_symbols=[SEPARATOR],
        num_threads=1, shuffle_input_sentence=False, minloglevel=2)
  except RuntimeError as e:
    raise TokenizerError(f"sentencepiece could not train a {vocab_size}-piece vocabulary: {e}. "
                         "Raise --vocab-size above the number of distinct characters, or check that "
                         "the captions are not empty.") from None
  io.write_bytes(out_path, buffer.getvalue())


@dataclasses.dataclass
class EncodedText:
  """A caption at fixed length: [CLS] pieces... [SEP] [PAD]...

  clause_ids: clause index per token (a "$" belongs to the clause it ends), -1 for special
  tokens and padding. keyword_mask: 1 where the token is part of a clause's keyword.
  """

  ids: np.ndarray  # int32 [L]
  keyword_mask: np.ndarray  # int32 [L]
  clause_ids: np.ndarray  # int32 [L]


class TextCodec:
  """Fixed-length encoding with keyword masks and clause ids. Picklable (for grain workers)."""

  def __init__(self, model: str | os.PathLike | bytes, max_len: int):
    source = "the tokenizer bytes given"
    if isinstance(model, (str, os.PathLike)):
      # Read as bytes (sentencepiece loads a model_proto), so the model may be on gs:// too.
      source = os.fspath(model)
      if not io.exists(model):
        raise TokenizerError(f"no tokenizer at {model}; train one with: {MAKE_ONE}")
      if io.path(model).is_dir():  # else a raw IsADirectoryError from the read
        raise TokenizerError(f"{model} is a directory, not a sentencepiece .model file; point at the "
                             f".model file itself, or train one with: {MAKE_ONE}")
      model = io.read_bytes(model)
    if max_len < 3:
      raise TokenizerError(f"max_len={max_len}: need room for [CLS], one piece and [SEP].")
    self._proto = model
    self.max_len = max_len
    self._load(source)

  def _load(self, source: str = "the tokenizer") -> None:
    # sentencepiece reports a file that is not a model as a bare RuntimeError from its protobuf
    # parser, and takes an empty one for a model with no pieces; both are the user's file.
    try:
      self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
    except RuntimeError:  # its message is the parser's source line, nothing a user can act on
      raise TokenizerError(f"{source} is not a sentencepiece .model file (sentencepiece cannot parse it); "
                           f"give the .model file `klip data tokenizer` wrote, or train one with: "
                           f"{MAKE_ONE}") from None
    if not self.sp.get_piece_size():
      raise TokenizerError(f"{source} is not a sentencepiece .model file (it holds no pieces); give the "
                           f".model file `klip data tokenizer` wrote, or train one with: {MAKE_ONE}")
    for piece in (PAD, UNK, DEC, SEP, CLS, ENC, MASK, SEPARATOR):
      if self.sp.piece_to_id(piece) == self.sp.unk_id() and piece != UNK:
        raise TokenizerError(f"the tokenizer lacks the piece {piece}; retrain it with klip data tokenizer.")
    self.pad_id, self.dec_id, self.sep_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
    self.cls_id, self.enc_id, self.mask_id = (self.sp.piece_to_id(p) for p in (CLS, ENC, MASK))
    self.separator_id = self.sp.piece_to_id(SEPARATOR)
    self.special_ids = frozenset((self.pad_id, self.dec_id, self.sep_id, self.cls_id, self.enc_id,
                                  self.mask_id, self.sp.unk_id()))

  def __getstate__(self):
    return {"_proto": self._proto, "max_len": self.max_len}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._load()

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  @property
  def trained_for(self) -> int:
    """The vocabulary size the tokenizer was trained with (`--vocab-size`, config.data.vocab_size),
    from its trainer settings: an upper bound, so `vocab_size` may be smaller."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(self._proto)
    return model.trainer_spec.vocab_size

  def pieces(self, caption: str, spans: Sequence[tuple[int, int]] = ()) -> tuple[list[int], list[int], list[int]]:
    """Unpadded piece ids of `caption` with per-piece keyword flag and clause index.

    A piece's character range starts at its first non-space character; it is a keyword piece
    when that range overlaps a span, and belongs to the clause its last character is in. Done
    in numpy over all pieces at once: this runs for every example the input pipeline reads."""
    pieces = self.sp.encode(caption, return_type="proto").pieces
    ids = [piece.id for piece in pieces]
    begin = np.fromiter((piece.begin for piece in pieces), np.int64, len(ids))
    end = np.fromiter((piece.end for piece in pieces), np.int64, len(ids))
    chars = np.frombuffer(caption.encode("utf-32-le"), np.uint32)  # code points
    ascii_only = caption.isascii()
    if not ascii_only:  # sentencepiece reports byte offsets; map them to characters
      byte_to_char = np.repeat(np.arange(len(caption) + 1), [len(c.encode("utf-8")) for c in caption] + [1])
      begin, end = byte_to_char[begin], byte_to_char[end]
    # The first non-space position at or after each character (len(caption) at the end).
    space = _ASCII_SPACE[chars] if ascii_only else np.array([c.isspace() for c in caption], bool)
    next_text = np.append(np.where(space, len(caption), np.arange(len(caption))), len(caption))
    next_text = np.minimum.accumulate(next_text[::-1])[::-1]
    begin = np.minimum(next_text[begin], end)
    spans = np.asarray(spans, np.int64).reshape(-1, 2)
    keyword = ((begin[:, None] < spans[None, :, 1]) & (spans[None, :, 0] < end[:, None])).any(1)
    clause_starts = np.append(0, np.flatnonzero(chars == ord(SEPARATOR)) + 1)
    clause = np.searchsorted(clause_starts, np.maximum(begin, end - 1), side="right") - 1
    return ids, keyword.astype(int).tolist(), clause.tolist()

  def encode(self, caption: str, spans: Sequence[tuple[int, int]] = ()) -> EncodedText:
    ids, keyword, clause = self.pieces(caption, spans)
    n = min(len(ids), self.max_len - 2)
    out = EncodedText(np.full(self.max_len, self.pad_id, np.int32),
                      np.zeros(self.max_len, np.int32), np.full(self.max_len, -1, np.int32))
    out.ids[0] = self.cls_id
    out.ids[1:n + 1] = ids[:n]
    out.ids[n + 1] = self.sep_id
    out.keyword_mask[1:n + 1] = keyword[:n]
    out.clause_ids[1:n + 1] = clause[:n]
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """Text of the non-special tokens, with the canonical "$" spacing of captions."""
    kept = [int(i) for i in ids if int(i) not in self.special_ids]
    clauses = []
    current: list[int] = []
    for i in kept + [self.separator_id]:
      if i == self.separator_id:
        clauses.append(self.sp.decode(current).strip())
        current = []
      else:
        current.append(i)
    return SEPARATOR.join(clauses)


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """The special token ids the model's steps, decoders and exports need, as static ints."""

  pad: int
  cls: int
  enc: int
  dec: int
  mask: int
  sep: int
  separator: int  # "$", between clauses
  vocab_size: int
  # Pieces that continue a word (no leading "▁"): a rewritten keyword may not start with one,
  # so the corrected caption's text is the same whether it is kept as ids or re-tokenised.
  continuations: tuple[int, ...] = ()

  @classmethod
  def from_codec(cls, codec: TextCodec) -> TokenIds:
    continuations = tuple(i for i in range(codec.vocab_size)
                          if not codec.sp.id_to_piece(i).startswith("▁") and i not in codec.special_ids)
    return cls(codec.pad_id, codec.cls_id, codec.enc_id, codec.dec_id, codec.mask_id, codec.sep_id,
               codec.separator_id, codec.vocab_size, continuations)

  def never_generated(self) -> tuple[int, ...]:
    """Ids a caption decoder never writes: padding and the markers of other text modes ([SEP]
    is written: it ends the caption)."""
    return tuple(sorted({self.pad, self.dec, self.cls, self.enc, self.mask}))

  def special(self) -> tuple[int, ...]:
    """Ids a decoder must never write into a keyword."""
    return tuple(sorted({self.pad, self.cls, self.enc, self.dec, self.mask, self.sep, self.separator}))
