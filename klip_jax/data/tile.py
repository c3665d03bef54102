"""Whole SAR scenes -> square chip GeoTIFFs and a manifest stub for `klip data ingest`.

A scene (any GDAL raster of any value type: integer or float amplitude, intensity, dB,
complex SLC) is cut into `chip` x `chip` windows every `stride` pixels, starting at the top-left
corner; windows that would cross the right or bottom edge are not cut (no padding invents
pixels). Each chip keeps the scene's samples, dtype, nodata value and CRS unchanged, with its
own geotransform (`window_transform`), so ingest converts and geo-references it like any
chip. A chip whose share of invalid pixels (nodata, masked, NaN) exceeds `max_nodata` is
skipped.

Chips go to OUT/<scene name>/<scene name>_r<row>_c<col>.tif (row, col: the chip's top-left
pixel in the scene); the stub OUT/<scene name>.jsonl has one line per chip with split, id,
image (relative to OUT) and value: declared, or detected on the whole scene by raster.py's
rule (a chip alone could be mistaken: a dB chip without negative values looks like
amplitude). Captions are the user's to add. Both are written atomically (a temporary name,
then a rename), so an interrupted run leaves the previous output or none, and a rerun
replaces them.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from klip_jax import io
from klip_jax.data import raster
from klip_jax.errors import RecordError


@dataclasses.dataclass
class Tiled:
  """What tiling one scene wrote."""

  scene: str
  manifest: str  # the stub
  chips: int
  skipped_nodata: int  # windows over max_nodata
  value: str


def windows(height: int, width: int, chip: int, stride: int) -> list[tuple[int, int]]:
  """(row, col) of the top-left pixel of every whole chip, row by row."""
  return [(r, c) for r in range(0, height - chip + 1, stride) for c in range(0, width - chip + 1, stride)]


def tile(scene: str, chip: int, stride: int, out: str, *, max_nodata: float = 0.5, value: str | None = None,
         band=None, split: str = "train") -> Tiled:
  """Cut `scene` into chips under `out` (see the module docstring). `band`: the band (or [I, Q]
  pair) the nodata share and the value type are judged on, written into the stub; chips keep
  every band of the scene."""
  import rasterio
  from rasterio.windows import Window

  if chip < 8 or stride < 1:
    raise RecordError(f"--chip {chip} --stride {stride}: chips need at least 8 pixels, strides at least 1")
  if not 0 <= max_nodata <= 1:
    raise RecordError(f"--max-nodata {max_nodata} is a share of pixels: give 0..1")
  if value is not None and value not in raster.VALUE_TYPES:
    raise RecordError(f"--value {value!r} is not a value type; use one of {list(raster.VALUE_TYPES)}")
  name = os.path.splitext(os.path.basename(scene))[0]
  try:
    src = rasterio.open(scene)
  except Exception as e:
    raise RecordError(f"scene {scene} cannot be read ({' '.join(str(e).split())}); give a GeoTIFF "
                      "or another GDAL raster") from None
  with src:
    try:
      chosen = raster.bands(band, src.count)
    except RecordError:
      raise RecordError(f"scene {scene} has {src.count} bands; choose one with --band N (1..{src.count}), "
                        "or --band I,Q for complex samples in two bands") from None
    if src.height < chip or src.width < chip:
      raise RecordError(f"scene {scene} is {src.height}x{src.width} pixels, smaller than one {chip} px chip")
    profile = {key: v for key, v in src.profile.items()
               if key not in ("blockxsize", "blockysize", "tiled", "interleave", "transform")}
    profile.update(driver="GTiff", width=chip, height=chip)
    masked = src.nodata is None and any(flags != [rasterio.enums.MaskFlags.all_valid] for flags in src.mask_flag_enums)
    lines, skipped, negative = [], 0, False
    with io.atomic_path(os.path.join(out, name), folder=True) as folder:
      os.makedirs(folder)
      for row, col in windows(src.height, src.width, chip, stride):
        window = Window(col, row, chip, chip)
        try:
          data, valid = raster.read_window(src, chosen, window)
          valid &= np.isfinite(data)
          samples = src.read(window=window)
        except Exception as e:
          raise RecordError(f"scene {scene} cannot be read at row {row}, col {col} "
                            f"({' '.join(str(e).split())}); the file is damaged: re-export it") from None
        if 1.0 - valid.mean() > max_nodata:
          skipped += 1
          continue
        if not np.iscomplexobj(data) and valid.any():
          negative |= bool(data[valid].min() < 0)
        chip_id = f"{name}_r{row:06d}_c{col:06d}"
        with rasterio.open(os.path.join(folder, f"{chip_id}.tif"), "w",
                           **profile, transform=src.window_transform(window)) as dst:
          dst.write(samples)
          if masked:  # a mask band rather than a nodata value: carry it over
            dst.write_mask(valid)
        lines.append({"split": split, "id": chip_id, "image": f"{name}/{chip_id}.tif",
                      **({"band": band} if band is not None else {})})
      if value is None:
        value = "complex" if len(chosen) == 2 else raster.value_rule(src.dtypes[chosen[0] - 1], negative)
    stub = os.path.join(out, f"{name}.jsonl")
    io.write_text(stub, "".join(json.dumps({**line, "value": value}) + "\n" for line in lines))
  return Tiled(scene, stub, len(lines), skipped, value)
