"""FUSAR-GEOVL-style field records as caption text: a chip's eight HCoT field values, verbalised
in our clause format with one keyword per clause.

Real HCoT text comes as field values, not as a "$"-joined caption. A field record is one JSON
object, either on the manifest line itself or in a separate JSONL joined by image_id
(`klip data ingest --records`, which `klip data hcot-parse` writes):

    {"image_id": "s1_0007", "scene_type": "landform",         # scene_type optional: from the names
     "Terrain": "The terrain is classified as a coastal plain, with ...", "Functionality": "...",
     "Distribution": "...", "Layout": "...", "Boundary": "...", "Buildings": "...",
     "Roads": "...", "Water": "...",
     "keywords": {"Terrain": "coastal plain"}}                 # optional, per field; wins

Landform scenes carry Terrain, Functionality, Distribution, Layout, Boundary, Buildings, Roads,
Water; target scenes Count, Location, Feature, Size, Category, Distribution, Region,
Environment. Names are case-insensitive and may also sit under "fields": {...}; on a manifest
line every key that starts with a capital letter is read as a field name. A record must hold
exactly the eight fields of its scene type: a missing, foreign or unknown field is refused with
the line, the file and the names to fix, because a seven-clause caption would silently shift
every later clause onto the wrong field (clause k IS field k for SCIO and VQA).

Verbalisation (why: the model, SCIO and VQA read clause k as field k in our template format):
clause k is field k's template (knowledge.TEMPLATES; template 0, 1 or 2 chosen by
crc32("image_id/field") % 3, so a rebuild gives the same caption) with the value in its slot; a
value that is already a sentence (at least five words, and its first word the/this/these/there/
it/its/they/no or an "is"/"are"/"was"/"were" among words 2-4, as in "Buildings are sparse ...")
is the clause as written, since wrapping it would repeat its subject. Values keep their words;
whitespace is collapsed and a final full stop dropped; a "$" (the clause separator) in a value
is refused.

Keyword rule (the span masked by keyword reconstruction and rewritten by SCIO; short key
phrases as in the paper, so that reconstruction asks for the fact, not for the whole text):
  1. an explicit `keywords` entry (a {field: phrase} map or a list in field order) wins; it
     must occur in the value (case-insensitively), as whole words where it can (not "port"
     inside "airport", nor "2" inside "12"; only a keyword that is nowhere a whole word is
     taken inside a word, at its first occurrence), and as a whole word once: a keyword that
     occurs twice is refused (give a longer phrase that occurs once);
  2. Count and Size of target scenes: the first number in the value ("12", "180", "3.5" or a
     number word such as "three");
  3. otherwise the value's head phrase: the words after the first verb cue ("is", "are",
     "classified as", "identified as", "located in", "dominated by", ... : CUES) if one comes
     before the first comma-like break, else from the start; leading articles and hedges
     ("a", "the", "mainly", "approximately", ...) skipped; ending at the next punctuation
     break, subordinating word ("with", "which", "that", "along", ... : BREAKS) or verb cue,
     after at most MAX_KEYWORD_WORDS words; trailing function words ("and", "of", ...) dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import zlib

from klip_jax.data import knowledge
from klip_jax.errors import RecordError

MAX_KEYWORD_WORDS = 6
SENTENCE_STARTS = ("the", "this", "these", "there", "it", "its", "they", "no")
# Verb cues: the head phrase starts after the first one (and ends before the next).
CUES = tuple(tuple(c.split()) for c in (
    "is", "are", "was", "were", "appears as", "appear as", "classified as", "identified as",
    "recognized as", "recognised as", "categorized as", "categorised as", "characterized by",
    "characterised by", "dominated by", "consists of", "consist of", "composed of", "located in",
    "located at", "situated in", "situated near", "distributed in", "distributed across",
    "distributed along", "lies near", "lie near", "near", "oriented"))
# Skipped where a head phrase starts: articles and hedges carry no fact.
FILLERS = frozenset(("a", "an", "the", "mainly", "mostly", "primarily", "predominantly", "largely",
                     "generally", "approximately", "about", "around", "roughly", "nearly", "likely",
                     "probably", "some", "several", "estimated", "at"))
BREAKS = frozenset(("with", "which", "that", "where", "while", "whereas", "although", "though", "but",
                    "because", "due", "as", "along", "featuring", "including", "indicating", "suggesting",
                    "showing", "forming", "reflecting", "surrounded", "possibly", "and/or"))
_PUNCT_BREAKS = frozenset(",;:.()[]!?\"—–")
_TRAILING = frozenset(("and", "or", "of", "in", "on", "at", "to", "the", "a", "an", "for", "by", "from",
                       "into", "its", "their"))
NUMBER_WORDS = {w: i for i, w in enumerate(
    ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
     "sixteen seventeen eighteen nineteen twenty").split())}
_NUMBER = re.compile(r"\b\d+(?:[.,]\d+)*\b|\b(?:" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|\w[\w'’/-]*|[^\w\s]")
_NUMERIC_FIELDS = {("target", "count"), ("target", "size")}

# Keys of a field record (and of a manifest line) that are not field values.
RECORD_KEYS = ("image_id", "id", "scene_type", "keywords", "fields")


class FieldError(RecordError):
  """A field record that cannot be verbalised; `kind` names the class of problem (for
  `klip data hcot-parse`'s summary), the message says where and how to fix it."""

  def __init__(self, where: str, kind: str, reason: str):
    super().__init__(f"{where}: {reason}")
    self.kind, self.reason = kind, reason


@dataclasses.dataclass(frozen=True)
class FieldRecord:
  """The eight values of one chip in clause order, and the explicit keywords it gives."""

  image_id: str
  scene_type: str
  values: tuple[str, ...]  # in knowledge.FIELDS[scene_type] order
  keywords: tuple[str | None, ...]  # explicit keyword per field, None: the rule picks it

  def as_json(self) -> dict:
    """The record as FUSAR-GEOVL-style JSON (capitalised field names), as hcot-parse writes it."""
    out = {"image_id": self.image_id, "scene_type": self.scene_type}
    names = [display_name(n) for n in knowledge.FIELDS[self.scene_type]]
    out.update(zip(names, self.values))
    given = {n: k for n, k in zip(names, self.keywords) if k is not None}
    if given:
      out["keywords"] = given
    return out


def display_name(field: str) -> str:
  return field.capitalize()


def _all_field_names() -> set[str]:
  return {n for names in knowledge.FIELDS.values() for n in names}


def _is_field_key(key: str) -> bool:
  """A manifest/record key holding a field value: a field name, or any key with a capital."""
  return key not in RECORD_KEYS and (key[:1].isupper() or key.lower() in _all_field_names())


def _field_items(entry: dict, where: str) -> dict[str, object]:
  """field name (lower case) -> raw value, from entry["fields"] or the entry's field keys."""
  if "fields" in entry:
    if not isinstance(entry["fields"], dict):
      raise FieldError(where, "bad fields", f"'fields' must be an object of field values, got "
                       f"{type(entry['fields']).__name__}.")
    raw = entry["fields"]
  else:
    raw = {k: v for k, v in entry.items() if _is_field_key(k)}
  out = {}
  for key, value in raw.items():
    name = key.strip().lower()
    if name not in _all_field_names():
      raise FieldError(where, "unknown field", f"{key!r} is not an HCoT field; landform scenes have "
                       f"{_names('landform')}, target scenes {_names('target')} (put other data under "
                       "'geo' or 'truth').")
    if name in out:
      raise FieldError(where, "duplicate field", f"field {display_name(name)} is given twice.")
    out[name] = value
  return out


def _names(scene_type: str) -> str:
  return ", ".join(display_name(n) for n in knowledge.FIELDS[scene_type])


def has_fields(entry: dict) -> bool:
  """Whether a manifest line carries field values (rather than a caption)."""
  return "fields" in entry or any(_is_field_key(k) for k in entry)


def _scene_type(entry: dict, names: set[str], where: str) -> str:
  given = entry.get("scene_type")
  if given is not None:
    if given not in knowledge.FIELDS:
      raise FieldError(where, "scene type", f"scene_type is {given!r}; use 'landform' or 'target'.")
    return given
  only = {s: names & (set(f) - set(knowledge.FIELDS[other]))
          for s, f, other in (("landform", knowledge.LANDFORM_FIELDS, "target"),
                              ("target", knowledge.TARGET_FIELDS, "landform"))}
  if only["landform"] and only["target"]:
    raise FieldError(where, "field count", f"mixes landform fields ({_listed(only['landform'])}) with target "
                     f"fields ({_listed(only['target'])}); a record holds the eight fields of one scene type.")
  if not (only["landform"] or only["target"]):
    raise FieldError(where, "scene type", "cannot tell the scene type from the field names; add "
                     "\"scene_type\": \"landform\" or \"target\".")
  return "landform" if only["landform"] else "target"


def _listed(names) -> str:
  """Field names in schema order (landform fields first)."""
  order = list(dict.fromkeys(knowledge.LANDFORM_FIELDS + knowledge.TARGET_FIELDS))
  return ", ".join(display_name(n) for n in sorted(names, key=order.index))


def _clean(value, field: str, where: str) -> str:
  if isinstance(value, bool) or value is None:
    raise FieldError(where, "bad value", f"field {display_name(field)} is {value!r}; give text.")
  if isinstance(value, (int, float)):
    value = str(int(value)) if float(value).is_integer() else str(value)
  elif isinstance(value, list) and all(isinstance(v, str) for v in value) and value:
    value = knowledge.join_words([v.strip() for v in value])
  elif not isinstance(value, str):
    raise FieldError(where, "bad value", f"field {display_name(field)} is a {type(value).__name__}; give text.")
  text = " ".join(value.split()).rstrip(".").strip()
  if not text:
    raise FieldError(where, "empty value", f"field {display_name(field)} is empty; give its text.")
  if knowledge.SEPARATOR in text:
    raise FieldError(where, "separator in value", f"field {display_name(field)} contains "
                     f"{knowledge.SEPARATOR!r}, the clause separator; remove it from the value.")
  return text


def _explicit_keywords(entry: dict, names: tuple[str, ...], where: str) -> list[str | None]:
  given = entry.get("keywords")
  if given is None:
    return [None] * len(names)
  if isinstance(given, list):
    if len(given) != len(names):
      raise FieldError(where, "keywords", f"'keywords' lists {len(given)} entries for {len(names)} fields; "
                       "give one per field in field order, or a {field: phrase} object.")
    return [k if k else None for k in given]
  if not isinstance(given, dict):
    raise FieldError(where, "keywords", "'keywords' must be a {field: phrase} object or a list in field order.")
  lower = {str(k).strip().lower(): v for k, v in given.items()}
  unknown = sorted(set(lower) - set(names))
  if unknown:
    raise FieldError(where, "keywords", f"'keywords' names {unknown}, not fields of this scene ({', '.join(names)}).")
  return [lower.get(n) or None for n in names]


def parse(entry: dict, where: str) -> FieldRecord:
  """A field record (or a manifest line carrying one) -> FieldRecord; FieldError naming `where`
  and the fix when its fields do not match its scene type."""
  items = _field_items(entry, where)
  scene_type = _scene_type(entry, set(items), where)
  expected = knowledge.FIELDS[scene_type]
  missing = [n for n in expected if n not in items]
  foreign = [n for n in items if n not in expected]
  if missing or foreign:
    problems = ([f"{_listed(missing)} missing"] if missing else []) + \
        ([f"{_listed(foreign)} not {scene_type} field{'s' if len(foreign) > 1 else ''}"] if foreign else [])
    raise FieldError(where, "field count", f"{len(items)} fields for a {scene_type} scene "
                     f"({'; '.join(problems)}); a {scene_type} record needs exactly these eight: "
                     f"{_names(scene_type)}.")
  values = tuple(_clean(items[n], n, where) for n in expected)
  explicit = _explicit_keywords(entry, expected, where)
  for name, value, keyword in zip(expected, values, explicit):
    if keyword is None:
      continue
    spans = _find(value, keyword) if isinstance(keyword, str) else []
    if not spans:
      raise FieldError(where, "keywords", f"keyword {keyword!r} of {display_name(name)} does not occur in its "
                       f"value {value!r}; copy it from the value, or leave it out to use the head-phrase rule.")
    if len(spans) > 1:
      raise FieldError(where, "keywords", f"keyword {keyword!r} of {display_name(name)} occurs {len(spans)} times "
                       f"as a word in its value {value!r}, so which one is meant is unclear; give a longer keyword "
                       "(with a neighbouring word) that occurs once.")
  image_id = entry.get("image_id", entry.get("id"))
  return FieldRecord(str(image_id) if image_id is not None else "", scene_type, values, tuple(explicit))


def word_spans(text: str, keyword: str, flags: int = 0) -> list[tuple[int, int]]:
  """Spans of every whole-word occurrence of `keyword` in `text`: not inside a longer word or
  number ("port" in "airport", "2" in "12" or "2.5"), so a keyword is not masked or rewritten in
  the middle of another word. A keyword edge that is no word character needs no boundary."""
  if not keyword:
    return []
  before = (r"(?<!\d[.,])" if keyword[0].isdigit() else "") + (r"(?<!\w)" if re.match(r"\w", keyword[0]) else "")
  after = (r"(?!\w)" if re.match(r"\w", keyword[-1]) else "") + (r"(?![.,]\d)" if keyword[-1].isdigit() else "")
  pattern = re.compile(before + "(?=" + re.escape(keyword) + after + ")", flags)  # a lookahead: overlaps count
  return [(m.start(), m.start() + len(keyword)) for m in pattern.finditer(text)]


def _find(value: str, keyword: str) -> list[tuple[int, int]]:
  """Spans of an explicit keyword in its value: its whole-word occurrences (exact case, else
  ignoring case); only when there is none, its first occurrence inside a word (exact case, else
  ignoring case); [] when it does not occur. More than one span: ambiguous (parse refuses it)."""
  keyword = " ".join(keyword.split())
  if not keyword:
    return []
  spans = word_spans(value, keyword) or word_spans(value, keyword, re.IGNORECASE)
  if spans:
    return spans
  at = value.find(keyword)
  if at < 0:
    at = value.lower().find(keyword.lower())
  return [] if at < 0 else [(at, at + len(keyword))]


# ---------------------------------------------------------------------------------------------
# The keyword rule.


def _tokens(value: str) -> list[tuple[str, int, int]]:
  return [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(value)]


def _cue_at(words: list[str], i: int) -> int:
  """Length of the verb cue starting at word i (0: none); the longest cue wins."""
  return max((len(c) for c in CUES if tuple(words[i:i + len(c)]) == c), default=0)


def _is_break(word: str) -> bool:
  return word in _PUNCT_BREAKS or word in BREAKS


def head_phrase(value: str) -> tuple[int, int]:
  """Character span of the value's head phrase (the module docstring's rule 3)."""
  tokens = _tokens(value)
  words = [t.lower() for t, _, _ in tokens]
  first_break = next((i for i, w in enumerate(words) if _is_break(w)), len(words))
  start = 0
  for i in range(first_break):
    if n := _cue_at(words, i):
      start = i + n
      break
  while start < len(words) and (words[start] in FILLERS or _cue_at(words, start)):
    start += max(_cue_at(words, start), 1)
  end = start
  while end < len(words) and end - start < MAX_KEYWORD_WORDS and not _is_break(words[end]) \
      and not _cue_at(words, end):
    end += 1
  while end > start and words[end - 1] in _TRAILING:
    end -= 1
  if end == start:  # no phrase by the rule: the value's first words
    start = 0
    end = min(len(words), MAX_KEYWORD_WORDS)
    while end > 1 and (words[end - 1] in _TRAILING or words[end - 1] in _PUNCT_BREAKS):
      end -= 1
  return tokens[start][1], tokens[end - 1][2]


def first_number(text: str) -> tuple[int, int] | None:
  """Span of the first number (digits or a number word up to twenty) in `text`."""
  m = _NUMBER.search(text)
  return (m.start(), m.end()) if m else None


def number_value(text: str) -> str | None:
  """The first number in `text` as digits ("three" -> "3", "1,200" -> "1200"), None if none."""
  span = first_number(text)
  if span is None:
    return None
  word = text[span[0]:span[1]].lower()
  if word in NUMBER_WORDS:
    return str(NUMBER_WORDS[word])
  digits = word.replace(",", "")
  return digits[:-2] if digits.endswith(".0") else digits


def keyword_span(scene_type: str, field: str, value: str, explicit: str | None = None) -> tuple[int, int]:
  """Character span of the keyword in `value`: explicit, else a number, else the head phrase."""
  if explicit is not None:
    spans = _find(value, explicit)
    if spans:  # parse refuses a keyword that occurs more than once
      return spans[0]
  if (scene_type, field) in _NUMERIC_FIELDS and (span := first_number(value)) is not None:
    return span
  return head_phrase(value)


# ---------------------------------------------------------------------------------------------
# Verbalisation.


_VERBS = frozenset(("is", "are", "was", "were"))


def is_sentence(value: str) -> bool:
  """Whether a value reads as a sentence of its own (then it is its clause, untemplated)."""
  words = value.lower().split()
  return len(words) >= 5 and (words[0] in SENTENCE_STARTS or bool(_VERBS & set(words[1:4])))


def template_choice(image_id: str, scene_type: str) -> list[int]:
  """Template per field: crc32("image_id/field") % 3 (stable across runs and machines)."""
  return [zlib.crc32(f"{image_id}/{name}".encode()) % len(knowledge.TEMPLATES[scene_type][name])
          for name in knowledge.FIELDS[scene_type]]


def verbalise(record: FieldRecord, choice=None) -> tuple[str, list[str], list[tuple[int, int]]]:
  """(caption, keywords, keyword spans) of a field record in our clause format."""
  choice = template_choice(record.image_id, record.scene_type) if choice is None else choice
  clauses, keywords, spans, offset = [], [], [], 0
  for name, value, explicit, c in zip(knowledge.FIELDS[record.scene_type], record.values, record.keywords,
                                      choice):
    prefix, suffix = ("", "") if is_sentence(value) else knowledge.TEMPLATES[record.scene_type][name][c].split("{}")
    a, b = keyword_span(record.scene_type, name, value, explicit)
    clauses.append(prefix + value + suffix)
    keywords.append(value[a:b])
    spans.append((offset + len(prefix) + a, offset + len(prefix) + b))
    offset += len(clauses[-1]) + len(knowledge.SEPARATOR)
  return knowledge.SEPARATOR.join(clauses), keywords, spans


# ---------------------------------------------------------------------------------------------
# Manifests: field records on the line or joined by image_id from a records JSONL.


class RecordIndex:
  """The field records of a JSONL file, by image_id (each remembered with its file:line)."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, "rb") as f:
        raw = f.read()
    except OSError as e:
      raise RecordError(f"cannot read field records {path}: {e.strerror}.") from None
    self.sha256 = hashlib.sha256(raw).hexdigest()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      line = raw[:e.start].count(b"\n") + 1
      raise RecordError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8.") from None
    self.by_id: dict[str, tuple[str, dict]] = {}
    for number, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        entry = json.loads(line)
      except json.JSONDecodeError as e:
        raise RecordError(f"{where}: not JSON ({e}).") from None
      if not isinstance(entry, dict) or not isinstance(entry.get("image_id"), str) or not entry["image_id"]:
        raise RecordError(f"{where}: a field record needs an \"image_id\" string naming its chip.")
      if entry["image_id"] in self.by_id:
        raise RecordError(f"{where}: image_id {entry['image_id']!r} repeats {self.by_id[entry['image_id']][0]}; "
                          "give each chip one field record.")
      self.by_id[entry["image_id"]] = (where, entry)

  def check_joined(self, chip_ids, manifest: str) -> None:
    """Refuse records whose image_id names no chip of the manifest (a typo on either side)."""
    chips = set(chip_ids)
    stray = [(where, i) for i, (where, _) in self.by_id.items() if i not in chips]
    if stray:
      where, image_id = stray[0]
      more = f" ({len(stray) - 1} more)" if len(stray) > 1 else ""
      raise RecordError(f"{where}: image_id {image_id!r} names no chip in {manifest}{more}; fix the id or "
                        "remove the record.")


def chip_id(entry: dict):
  return entry.get("id", entry.get("image_id"))


def caption_entry(entry: dict, where: str, records: RecordIndex | None = None) -> dict:
  """A manifest line with its text as ingest reads it: field values (on the line or joined from
  `records` by id) verbalised into scene_type/caption/keywords/spans, and "id" defaulting to
  "image_id". A line with a ready caption is checked for one clause per field of its scene."""
  entry = dict(entry)
  if "id" not in entry and "image_id" in entry:
    entry["id"] = entry["image_id"]
  text_where = where
  if records is not None and chip_id(entry) in records.by_id:
    if "caption" in entry or has_fields(entry):
      raise RecordError(f"{where}: chip {chip_id(entry)!r} has text on its line and a field record at "
                        f"{records.by_id[chip_id(entry)][0]}; keep one of them.")
    text_where, record = records.by_id[chip_id(entry)]
    entry.update({k: v for k, v in record.items() if k != "image_id"})
  if "caption" in entry:
    if has_fields(entry):
      raise RecordError(f"{where}: the line has both a caption and field values; give one of them.")
    _check_clause_count(entry, where)
    return entry
  if not has_fields(entry):
    hint = f" and no field record in {records.path}" if records is not None else ""
    raise RecordError(f"{where}: chip {chip_id(entry)!r} has no caption, no field values{hint}; add its text "
                      "(klip data hcot-prompts writes LLM prompts for chips without text).")
  record = parse({**entry, "image_id": str(chip_id(entry))}, text_where)
  caption, keywords, spans = verbalise(record)
  out = {k: v for k, v in entry.items() if k not in ("fields", "keywords") and not _is_field_key(k)}
  out.update(scene_type=record.scene_type, caption=caption, keywords=keywords, spans=spans)
  return out


def _check_clause_count(entry: dict, where: str) -> None:
  scene_type, caption = entry.get("scene_type"), entry.get("caption")
  if scene_type not in knowledge.FIELDS or not isinstance(caption, str):
    return  # ingest's own checks name these
  clauses = caption.split(knowledge.SEPARATOR)
  expected = len(knowledge.FIELDS[scene_type])
  if len(clauses) != expected:
    raise RecordError(f"{where}: the caption has {len(clauses)} clauses for a {scene_type} scene; give "
                      f"{expected}, one per field in order ({_names(scene_type)}), joined by "
                      f"{knowledge.SEPARATOR!r}.")
