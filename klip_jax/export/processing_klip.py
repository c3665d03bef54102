"""The processor of a klip_jax BLIP export: SAR chips and captions -> the model's inputs.

`klip export` ships this file in each model folder, where
`AutoProcessor.from_pretrained(folder, trust_remote_code=True)` loads it: SAR's amplitude ->
dB -> standardised-dB normalisation is not one of the operations of transformers' image
processors (rescale, normalise, resize), so it travels as code. It imports numpy, torch and
transformers only (PIL images are accepted, not required), never klip_jax, and computes what
klip_jax's input pipeline computes (klip_jax/data/pipeline.py `normalise`, data/tokenizer.py
`TextCodec.encode`).

    processor = AutoProcessor.from_pretrained("retrieval", trust_remote_code=True)
    batch = processor(images=chips, text=captions)          # pixel_values, input_ids, attention_mask
    batch = processor(text=captions, mode="itm")            # [ENC] first: image-grounded text
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor

# The first token says which text tower reads the text: unimodal ITC, image-grounded ITM, decoder.
FIRST_TOKEN = {"itc": "[CLS]", "itm": "[ENC]", "caption": "[DEC]"}
FORMATS = ("amplitude", "db")
LAYOUT = ("arrays are read as [H, W] (one chip), [C, H, W] with C 1 or 3 (one chip, channels first), "
          "[B, H, W] or [B, C, H, W] (a batch); or give a list of chips")


def _array(image) -> np.ndarray:
  if isinstance(image, torch.Tensor):
    return image.detach().cpu().numpy()
  array = np.asarray(image)
  if array.ndim == 3 and not isinstance(image, np.ndarray):  # a PIL image: [H, W, C]
    array = np.moveaxis(array, -1, 0)
  return array


def _chips(images) -> list[np.ndarray]:
  """Any accepted input -> a list of chips [C, H, W], C 1 or 3."""
  if isinstance(images, (list, tuple)):
    chips = [_array(image) for image in images]
    if any(c.ndim not in (2, 3) for c in chips):
      raise ValueError(f"a list holds one chip per item; got shapes {[c.shape for c in chips]}: {LAYOUT}.")
    return [c if c.ndim == 3 else c[None] for c in chips]
  array = _array(images)
  if array.ndim == 2:
    return [array[None]]
  if array.ndim == 3:
    return [array] if array.shape[0] in (1, 3) else list(array[:, None])
  if array.ndim == 4:
    return list(array)
  raise ValueError(f"images of shape {array.shape}: {LAYOUT}.")


def _one_channel(chip: np.ndarray) -> np.ndarray:
  """[C, H, W] -> [H, W]; a 3-channel chip must hold one channel three times."""
  if chip.shape[0] == 1:
    return chip[0]
  if chip.shape[0] != 3:
    raise ValueError(f"a chip of shape {chip.shape} has {chip.shape[0]} channels; SAR chips have 1 "
                     f"(or 3 equal ones): {LAYOUT}.")
  if not all(np.array_equal(chip[0], chip[c], equal_nan=chip.dtype.kind == "f") for c in (1, 2)):
    spread = float(np.nanmax(chip.astype(np.float64).max(0) - chip.astype(np.float64).min(0)))
    raise ValueError(
        f"a 3-channel chip whose channels differ (by up to {spread:g}): the model reads ONE SAR "
        "channel, which this processor replicates to the 3 its patch embedding takes. Pass the "
        "single-channel amplitude ([H, W] or [1, H, W]); a grey image in one channel with zeros "
        "in the others is not the same input and changes every similarity. (A [3, H, W] array "
        "is read as one 3-channel chip; for 3 chips pass [3, 1, H, W] or a list.)")
  return chip[0]


class SarImageProcessor(BaseImageProcessor):
  """Single-channel SAR chips -> `pixel_values` float32 [B, 3, H, W]: amplitude -> dB ->
  (dB - db_mean) / db_std with the training set's statistics, no-data (NaN) -> 0, the grey
  image replicated to 3 channels. Chips must be image_size px square: the ViT's position table
  fixes the size, and resampling SAR changes its speckle statistics, so this processor refuses
  other sizes instead of resizing."""

  model_input_names = ["pixel_values"]

  def __init__(self, db_mean: float = 0.0, db_std: float = 1.0, image_size: int = 224,
               float_floor_db: float = -100.0, **kwargs):
    super().__init__(**kwargs)
    self.db_mean, self.db_std = float(db_mean), float(db_std)
    self.image_size, self.float_floor_db = int(image_size), float(float_floor_db)

  def to_db(self, amplitude: np.ndarray) -> np.ndarray:
    """Integer digital numbers: zeros count as 1; float amplitude: floored at float_floor_db,
    NaN (no data) stays NaN."""
    floor = 1.0 if np.issubdtype(amplitude.dtype, np.integer) else 10.0 ** (self.float_floor_db / 20.0)
    return 20.0 * np.log10(np.maximum(amplitude.astype(np.float32), np.float32(floor)))

  def preprocess(self, images, input_format: str = "amplitude", return_tensors="pt") -> BatchFeature:
    """`images`: SAR amplitude (uint16 digital numbers or float32, NaN where there is no data),
    or dB with input_format="db"; one chip or a batch, see LAYOUT."""
    if input_format not in FORMATS:
      raise ValueError(f"input_format={input_format!r}; use one of {FORMATS}.")
    grey = []
    for chip in _chips(images):
      chip = _one_channel(chip)
      if chip.shape != (self.image_size, self.image_size):
        raise ValueError(f"a {chip.shape[0]}x{chip.shape[1]} chip: this model takes {self.image_size}x"
                         f"{self.image_size} chips (its position embeddings fix the size); cut chips of "
                         f"{self.image_size} px from larger scenes rather than resampling SAR.")
      db = self.to_db(chip) if input_format == "amplitude" else chip.astype(np.float32)
      grey.append(np.nan_to_num((db - self.db_mean) / self.db_std, nan=0.0).astype(np.float32))
    pixels = np.repeat(np.stack(grey)[:, None], 3, axis=1)
    return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)

  def __call__(self, images, **kwargs) -> BatchFeature:
    return self.preprocess(images, **kwargs)


class KlipSarProcessor(ProcessorMixin):
  """SAR image processor + the sentencepiece-equivalent tokenizer of a klip_jax export.

  Text is encoded as klip_jax's codec does: a mode-dependent first token ("itc": [CLS],
  unimodal text; "itm": [ENC], image-grounded text; "caption": [DEC], the decoder), the pieces,
  [SEP], padded with [PAD] to the model's max length and truncated to it. For a generate()
  prompt use mode="caption" and padding=False: BLIP's generate() drops the last token ([SEP]).
  """

  def __init__(self, image_processor, tokenizer):
    super().__init__(image_processor, tokenizer)

  def __call__(self, images=None, text=None, mode: str = "itc", input_format: str = "amplitude",
               padding="max_length", truncation: bool = True, return_tensors="pt") -> BatchFeature:
    if images is None and text is None:
      raise ValueError("give images=, text= or both.")
    out = {}
    if images is not None:
      out.update(self.image_processor(images, input_format=input_format, return_tensors=None))
    if text is not None:
      if mode not in FIRST_TOKEN:
        raise ValueError(f"mode={mode!r}; use one of {sorted(FIRST_TOKEN)} ({FIRST_TOKEN}).")
      encoded = self.tokenizer([text] if isinstance(text, str) else list(text), padding=padding,
                               truncation=truncation)
      first = self.tokenizer.convert_tokens_to_ids(FIRST_TOKEN[mode])
      out["input_ids"] = [[first] + ids[1:] for ids in encoded["input_ids"]]
      out["attention_mask"] = encoded["attention_mask"]
    return BatchFeature(out, tensor_type=return_tensors)
