"""Caption token lengths against data.max_len: the report's numbers against a reference computed
from sentencepiece ids and character positions alone, the warning, and `klip data tokenizer`."""

import numpy as np
import pytest

from klip_jax import cli
from klip_jax.data import fields, lengths
from klip_jax.data.tokenizer import TextCodec
from tests.data.text_cases import all_template_captions

LONG = {"Terrain": "The terrain in this SAR image is classified as a coastal plain, with flat low-lying land "
                   "between the river mouth and the hills further inland",
        "Functionality": "port logistics and fishing, with container terminals along the estuary and warehouses",
        "Distribution": "Farmland mainly in the lower right, with scattered villages and greenhouses",
        "Layout": "a patchwork of field parcels cut by drainage ditches and a few straight canals",
        "Boundary": "water and farmland, separated by a long embankment that runs from north to south",
        "Buildings": "Buildings are sparsely scattered along the coast and densely packed in the old town",
        "Roads": "a few straight roads linking the villages to the port, and one motorway",
        "Water": "The water body type is a winding river that crosses the scene from west to east."}


@pytest.fixture(scope="module")
def codec(tiny_tokenizer):
  return TextCodec(tiny_tokenizer, 96)


def _texts():
  texts = list(all_template_captions())
  for i in range(3):  # long free-text captions of three lengths
    # Lower case: the tests' tokenizer was trained on the synthetic (lower-case) captions.
    values = {k: (v if j % 3 >= i else v.split(",")[0]).lower() for j, (k, v) in enumerate(LONG.items())}
    caption, _, spans = fields.verbalise(fields.parse({"image_id": str(i), **values}, "t"), [0] * 8)
    texts.append((caption, spans))
  return texts


def _reference(codec, texts, max_len):
  """Lengths from sentencepiece ids; what is cut from the characters the kept ids decode to."""
  out = {"lengths": [], "clauses": 0, "cut": 0, "lost": 0, "keywords_cut": 0}
  for caption, spans in texts:
    ids = codec.sp.encode(caption)
    assert codec.sp.decode(ids) == caption  # the characters below are the caption's own
    out["lengths"].append(len(ids) + 2)
    kept = len(codec.sp.decode(ids[:max_len - 2]))
    clauses = caption.split("$")
    starts = np.cumsum([0] + [len(c) + 1 for c in clauses[:-1]])
    ends = [s + len(c) + (1 if k < len(clauses) - 1 else 0) for k, (s, c) in enumerate(zip(starts, clauses))]
    out["clauses"] += len(clauses)
    out["cut"] += sum(e > kept for e in ends)
    out["lost"] += sum(s >= kept for s in starts)
    out["keywords_cut"] += sum(b > kept for _, b in spans)
  return out


@pytest.mark.parametrize("max_len", [24, 48, 96, 512])
def test_report_matches_a_reference(codec, max_len):
  texts = _texts()
  report = lengths.measure(codec, texts, max_len)
  ref = _reference(codec, texts, max_len)
  lens = np.asarray(ref["lengths"])
  assert report.captions == len(texts) == 9
  assert (report.p50, report.p95) == tuple(np.percentile(lens, [50, 95]))
  assert report.longest == lens.max() and report.truncated == (lens > max_len).sum()
  assert (report.clauses, report.clauses_cut, report.clauses_lost) == (ref["clauses"], ref["cut"], ref["lost"])
  assert report.keywords == 72 and report.keywords_cut == ref["keywords_cut"]
  assert 0 < report.keyword_tokens < report.tokens == lens.sum() - 2 * len(texts)
  if max_len == 24:  # every caption is cut
    assert report.truncated == 9 and report.clauses_lost > 0


def test_warning_above_five_percent_names_the_fix(codec):
  texts = _texts()
  longest = lengths.measure(codec, texts, 512).longest
  assert lengths.measure(codec, texts, 512).warnings() == []
  report = lengths.measure(codec, texts, longest - 1)  # one caption (1 of 9 = 11%) cut by one token
  assert report.truncated == 1
  suggested = 32 * -(-longest // 32)
  recipe = " or --config=configs/real_text.py:tiny (256 tokens)" if longest <= 256 else ""
  assert report.warnings() == [
      f"warning: data.max_len={longest - 1} truncates 11.1% of the captions (over 5%): {report.clauses_cut} clauses "
      f"and {report.keywords_cut} keywords lose tokens the model never sees. Give max_len >= {longest}: "
      f"--config.data.max_len={suggested} --config.model.text.max_len={suggested}{recipe}."]
  text = report.text().splitlines()
  assert text[0].startswith("caption tokens of 9 captions, [CLS] and [SEP] included: p50 ")
  assert text[1] == report.warnings()[0]


def test_keywords_covering_most_tokens_are_warned_about(codec):
  caption = "the terrain is a very long keyword that covers nearly everything here"
  report = lengths.measure(codec, [(caption, [(15, len(caption))])], 512)
  assert report.keyword_share > 0.5
  assert report.warnings()[0].startswith("warning: keywords cover")


def test_tokenizer_command_reports_lengths(tiny_data, tmp_path, capsys):
  out = str(tmp_path / "tok.model")
  assert cli.main(["data", "tokenizer", "--data", tiny_data, "--vocab-size", "500", "--out", out,
                   "--max-len", "512"]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert printed[1].startswith("caption tokens of the train split (all 48 captions), [CLS] and [SEP] included: p50 ")
  assert "data.max_len=512 truncates 0 captions (0.0%)" in printed[1] and len(printed) == 3
  assert printed[2].startswith("note: data.max_len=512 pads every caption, and the longest here has 120 tokens: "
                               "--config.data.max_len=128 runs the text towers on 75% fewer tokens")
  assert cli.main(["data", "tokenizer", "--data", tiny_data, "--vocab-size", "500", "--out", out,
                   "--max-len", "16"]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert "data.max_len=16 truncates 48 captions (100.0%)" in printed[1]
  assert printed[2].startswith("warning: data.max_len=16 truncates 100.0% of the captions")
  assert printed[2].endswith("or --config=configs/real_text.py:tiny (256 tokens).")


def test_a_max_len_far_past_the_longest_caption_is_noted_with_the_saving(codec):
  texts = _texts()
  longest = lengths.measure(codec, texts, 512).longest
  fitted = 32 * -(-longest // 32)  # the longest caption, rounded up to a multiple of 32
  note = lengths.measure(codec, texts, 512).padding_note()
  assert note.startswith(f"note: data.max_len=512 pads every caption, and the longest here has {longest} tokens: "
                         f"--config.data.max_len={fitted} runs the text towers on {1 - fitted / 512:.0%} fewer tokens")
  assert note in lengths.measure(codec, texts, 512).text().splitlines()
  assert lengths.measure(codec, texts, fitted).padding_note() is None
  assert lengths.measure(codec, texts, longest - 1).padding_note() is None  # too short: the warning's case
