"""What a PyTorch user needs beside the exported weights: a processor, a tokenizer, test chips
and an example, all loadable without klip_jax.

Each model folder gets
- tokenizer.json + tokenizer_config.json: our sentencepiece model as a `tokenizers` BPE
  tokenizer (transformers' own sentencepiece conversion), [CLS] ... [SEP] around the pieces,
  so `AutoTokenizer.from_pretrained(folder)` encodes a caption as `TextCodec.encode` does;
- processing_klip.py + preprocessor_config.json + processor_config.json: the SAR processor
  (`AutoProcessor.from_pretrained(folder, trust_remote_code=True)`); SAR's amplitude -> dB
  normalisation is not expressible in transformers' image processors, so it ships as code,
  with the dataset's dB statistics in preprocessor_config.json.
The export root gets samples/ (test chips as the dataset stores them: 16-bit PNG, or .npy for
float chips, and captions.jsonl with the true and the noisy caption) and example.py, which
runs retrieval and captioning on them with torch/transformers/numpy/PIL only. The samples
exist because the dataset itself is ArrayRecord shards of TFDS-serialised examples, which only
array_record + tensorflow_datasets read.
"""

from __future__ import annotations

import logging
import os
from importlib import resources

from klip_jax import io
from klip_jax.data import builder, records
from klip_jax.data.tokenizer import CLS, DEC, ENC, MASK, PAD, SEP, UNK, TextCodec
from klip_jax.errors import DatasetError
from klip_jax.export import hf

log = logging.getLogger(__name__)

MODULE = "processing_klip"  # the shipped processor file, without .py
EXAMPLE = "example.py"
SAMPLES = "samples"
SAMPLE_COUNT = 64
SAMPLE_SPLIT = "test"
# What write() adds to the export root, beside the model folders.
TOP_LEVEL = (SAMPLES, EXAMPLE)


def _package_file(name: str) -> str:
  return resources.files("klip_jax.export").joinpath(name).read_text()


def tokenizer(codec: TextCodec, max_len: int):
  """A transformers fast tokenizer that encodes text as `codec.encode(text).ids` does:
  [CLS] pieces [SEP], truncated to and padded ([PAD]) to max_len with padding="max_length"."""
  _, transformers, _ = hf.require()
  from tokenizers import processors
  from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

  proto = import_protobuf().ModelProto()
  proto.ParseFromString(codec.sp.serialized_model_proto())
  vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
  backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
  backend.post_processor = processors.TemplateProcessing(
      single=f"{CLS} $A {SEP}", special_tokens=[(CLS, codec.cls_id), (SEP, codec.sep_id)])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, model_max_length=max_len, pad_token=PAD, unk_token=UNK, bos_token=DEC,
      eos_token=SEP, sep_token=SEP, cls_token=CLS, mask_token=MASK, extra_special_tokens=[ENC])


def _processor_files(folder, codec: TextCodec, max_len: int, image_size: int,
                     db_stats: tuple[float, float]) -> None:
  tokenizer(codec, max_len).save_pretrained(os.fspath(folder))
  processor = f"{MODULE}.KlipSarProcessor"
  io.write_text(folder / f"{MODULE}.py", _package_file(f"{MODULE}.py"))
  io.write_json(folder / "preprocessor_config.json", {
      "image_processor_type": "SarImageProcessor", "processor_class": "KlipSarProcessor",
      "auto_map": {"AutoImageProcessor": f"{MODULE}.SarImageProcessor", "AutoProcessor": processor},
      "db_mean": db_stats[0], "db_std": db_stats[1], "image_size": image_size,
      "float_floor_db": builder.FLOAT_FLOOR_DB})
  io.write_json(folder / "processor_config.json",
                {"processor_class": "KlipSarProcessor", "auto_map": {"AutoProcessor": processor}})


def _samples(folder, data_dir: str, count: int) -> int:
  """The first `count` chips of the sample split as stored (PNG or .npy bytes) and
  captions.jsonl; returns how many were written."""
  try:
    source = builder.open_split(data_dir, SAMPLE_SPLIT)
  except DatasetError as e:
    log.warning("no sample chips in the export: %s", e)
    return 0
  lines = []
  os.makedirs(folder)
  for i in range(min(count, len(source))):
    record = records.from_example(source[i], decode_rasters=False)
    name = f"{i:03d}.{'npy' if record['image'].startswith(records.NPY_MAGIC) else 'png'}"
    io.write_bytes(folder / name, record["image"])
    lines.append({"file": name, "id": record["id"], "caption": records.true_text(record)[1],
                  "noisy_caption": record["caption"]})
  io.write_jsonl(folder / "captions.jsonl", lines)
  return len(lines)


def write(out, models: tuple[str, ...], codec: TextCodec, max_len: int, image_size: int,
          data_dir: str, db_stats: tuple[float, float] | None) -> None:
  """The tokenizer and processor into each model folder out/NAME, samples/ and example.py into
  `out` (a local folder being assembled)."""
  if db_stats is None:
    log.warning("%s records no dB statistics (a dataset built before they were); the export has "
                "a tokenizer but no image processor: normalise chips yourself", data_dir)
  for name in models:
    if db_stats is None:
      tokenizer(codec, max_len).save_pretrained(os.fspath(out / name))
    else:
      _processor_files(out / name, codec, max_len, image_size, db_stats)
  _samples(out / SAMPLES, data_dir, SAMPLE_COUNT)
  io.write_text(out / EXAMPLE, _package_file("pytorch_example.py"))


def readme_section(name: str) -> str:
  """The README's markdown on loading the processor and tokenizer and running the example."""
  return f"""## Processor, tokenizer and example (no klip_jax needed)

```python
from transformers import AutoProcessor, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}")  # = the sentencepiece codec, [CLS] ... [SEP]
processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)  # runs {MODULE}.py
batch = processor(images=amplitude, text=["a caption"])  # pixel_values [B, 3, H, W], input_ids, attention_mask
itm_text = processor(text=["a caption"], mode="itm")  # [ENC] first: image-grounded text (ITM)
prompt = processor(text=["a prompt"], mode="caption", padding=False)  # [DEC] first: generate() prompt
```

`images` is single-channel SAR amplitude (uint16 digital numbers or float32, NaN = no data) or,
with `input_format="db"`, dB: one chip `[H, W]` / `[1, H, W]`, a batch `[B, 1, H, W]`, a list,
or PIL images (16-bit PNG: mode I;16). The processor standardises dB
with the training set's statistics (preprocessor_config.json) and replicates the grey image to
the 3 channels the model takes; a 3-channel input whose channels differ, or a chip of another
size, is refused with the reason. `{MODULE}.py` is short and imports numpy, torch and
transformers only: read it before trusting remote code.

`../{EXAMPLE}` runs text<->image retrieval on the first (up to {SAMPLE_COUNT}) {SAMPLE_SPLIT} chips in
`../{SAMPLES}/` (the dataset's own PNG/.npy bytes: the dataset is ArrayRecord shards that need
tensorflow_datasets to read) and captions three: `python {EXAMPLE}` in the export's root folder.
`../{SAMPLES}/captions.jsonl` holds each chip's true caption (`caption`) and the noisy one the
dataset's `caption` field stores (`noisy_caption`).
"""
