"""Caption token lengths against `data.max_len`: what truncation costs, reported before training.

The codec cuts every caption to max_len tokens ([CLS] and [SEP] included) without a word; the
synthetic world's captions fit, but LLM-written HCoT text runs 81-226 tokens, and at 128
whole clauses vanish from the end of most captions, taking their keywords (what reconstruction
and SCIO work on) with them. `klip data tokenizer` and `klip train` print this report, and a
warning when more than WARN_TRUNCATED of the captions are cut (or keywords cover more than
WARN_KEYWORD_SHARE of the tokens: reconstruction then asks for most of the caption, not for its
facts). Fix: a longer max_len (data.max_len AND model.text.max_len, e.g. configs/real_text.py).

A clause is cut when any of its tokens (its closing "$" included) lies past the cut, lost when
none is kept; a keyword is cut when any of its tokens lies past the cut.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from klip_jax.data import builder, records
from klip_jax.data.tokenizer import TextCodec

WARN_TRUNCATED = 0.05
WARN_KEYWORD_SHARE = 0.5
SAMPLE = 2000  # captions read from the split: enough for the percentiles, quick at start-up
SPECIAL = 2  # [CLS] and [SEP]


@dataclasses.dataclass(frozen=True)
class LengthReport:
  max_len: int
  captions: int
  p50: float
  p95: float
  longest: int
  truncated: int  # captions longer than max_len
  clauses: int
  clauses_cut: int
  clauses_lost: int
  keywords: int
  keywords_cut: int
  tokens: int  # caption tokens, special tokens excluded
  keyword_tokens: int
  label: str = ""  # which captions, e.g. "the train split (first 2000 of 20000)"

  @property
  def truncated_share(self) -> float:
    return self.truncated / max(self.captions, 1)

  @property
  def keyword_share(self) -> float:
    return self.keyword_tokens / max(self.tokens, 1)

  def suggested_max_len(self) -> int:
    """The longest caption rounded up to a multiple of 32."""
    return 32 * math.ceil(self.longest / 32)

  def warnings(self) -> list[str]:
    out = []
    if self.truncated_share > WARN_TRUNCATED:
      n = self.suggested_max_len()
      recipe = " or --config=configs/real_text.py:tiny (256 tokens)" if self.longest <= 256 else ""
      out.append(f"warning: data.max_len={self.max_len} truncates {self.truncated_share:.1%} of the captions "
                 f"(over {WARN_TRUNCATED:.0%}): {self.clauses_cut} clauses and {self.keywords_cut} keywords lose "
                 f"tokens the model never sees. Give max_len >= {self.longest}: --config.data.max_len={n} "
                 f"--config.model.text.max_len={n}{recipe}.")
    if self.keyword_share > WARN_KEYWORD_SHARE:
      out.append(f"warning: keywords cover {self.keyword_share:.0%} of the caption tokens; keyword reconstruction "
                 "then asks for most of the caption, not for its facts. Give short key phrases (field records' "
                 "'keywords', or let the head-phrase rule of klip_jax/data/fields.py pick them).")
    return out

  def padding_note(self) -> str | None:
    """Every caption is padded to max_len, and the text towers run on every padded token:
    when even the longest caption leaves a multiple of 32 unused, say what a shorter max_len saves."""
    n = self.suggested_max_len()
    if n >= self.max_len:
      return None
    return (f"note: data.max_len={self.max_len} pads every caption, and the longest here has {self.longest} tokens: "
            f"--config.data.max_len={n} runs the text towers on {1 - n / self.max_len:.0%} fewer tokens "
            "(SCIO's rewrites may lengthen a caption; one that outgrows max_len is cut, as the tokenizer cuts).")

  def text(self) -> str:
    label = self.label or f"{self.captions} captions"
    lines = [
        f"caption tokens of {label}, [CLS] and [SEP] included: p50 {self.p50:.0f}, "
        f"p95 {self.p95:.0f}, max {self.longest} tokens; data.max_len={self.max_len} truncates {self.truncated} "
        f"captions ({self.truncated_share:.1%}), cutting {self.clauses_cut} of {self.clauses} clauses "
        f"({self.clauses_lost} lost whole) and {self.keywords_cut} of {self.keywords} keywords; keywords are "
        f"{self.keyword_share:.0%} of the caption tokens"]
    note = self.padding_note()
    return "\n".join(lines + self.warnings() + ([note] if note else []))


def measure(codec: TextCodec, texts: Iterable[tuple[str, Sequence[tuple[int, int]]]], max_len: int,
            label: str = "") -> LengthReport:
  """The report of (caption, keyword spans) pairs at `max_len` tokens."""
  keep = max_len - SPECIAL
  lengths, counts = [], dict.fromkeys(("clauses", "clauses_cut", "clauses_lost", "keywords", "keywords_cut",
                                       "tokens", "keyword_tokens"), 0)
  for caption, spans in texts:
    _, keyword, clause = codec.pieces(caption, spans)
    keyword, clause = np.asarray(keyword, bool), np.asarray(clause, np.int64)
    lengths.append(len(clause) + SPECIAL)
    kept = np.arange(len(clause)) < keep
    for k in np.unique(clause[clause >= 0]):
      mine = clause == k
      counts["clauses"] += 1
      counts["clauses_cut"] += bool((mine & ~kept).any())
      counts["clauses_lost"] += not (mine & kept).any()
      if (mine & keyword).any():
        counts["keywords"] += 1
        counts["keywords_cut"] += bool((mine & keyword & ~kept).any())
    counts["tokens"] += len(clause)
    counts["keyword_tokens"] += int(keyword.sum())
  captions = len(lengths)
  lengths = np.asarray(lengths or [SPECIAL])
  p50, p95 = np.percentile(lengths, [50, 95])
  return LengthReport(max_len=max_len, captions=captions, p50=float(p50), p95=float(p95),
                      longest=int(lengths.max()), truncated=int((lengths > max_len).sum()), label=label, **counts)


def of_split(data_dir: str, codec: TextCodec, max_len: int, split: str = "train", limit: int = SAMPLE) -> LengthReport:
  """The report of the first `limit` captions of a dataset split (as stored: keyword spans kept)."""
  source = builder.open_split(data_dir, split)
  n = min(len(source), limit)
  texts = ((r["caption"], r["spans"].tolist())
           for r in (records.from_example(source[i], decode_rasters=False) for i in range(n)))
  what = f"all {n}" if n == len(source) else f"first {n} of {len(source)}"
  return measure(codec, texts, max_len, label=f"the {split} split ({what} captions)")
