"""Small GeoTIFFs and manifest lines for the ingest and tiling tests, written with rasterio."""

import json

import rasterio
from rasterio.transform import from_origin

from klip_jax.data import knowledge

KEYWORDS = ["2", "upper left and centre", "north-south", "150", "cargo ships", "scattered across the scene",
            "qingdao, china", "a coastal harbour"]
GEO = {"platform": "Gaofen-3", "band": "C", "polarization": "HH", "incidence_deg": 35.2, "looks": 1,
       "acquired": "2021-06-30", "city": "Qingdao", "country": "China"}
UTM = ("EPSG:32651", from_origin(500000.0, 3990000.0, 3.0, 3.0))  # 3 m pixels near Qingdao
WGS84 = ("EPSG:4326", from_origin(120.30, 36.10, 3e-5, 3e-5))  # ~2.7 x 3.3 m pixels there


def write(path, data, crs_transform=UTM, nodata=None):
  """A GeoTIFF of `data` ([H, W] or [bands, H, W]) in the given (CRS, geotransform)."""
  data = data[None] if data.ndim == 2 else data
  crs, transform = crs_transform
  with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                     dtype=data.dtype, crs=crs, transform=transform, nodata=nodata) as dst:
    dst.write(data)
  return str(path)


def entry(i, image, split="train", **extra):
  """A manifest line of a target chip with a valid eight-clause caption."""
  caption, _ = knowledge.verbalise("target", KEYWORDS, [i % 3] * 8)
  return {"split": split, "id": f"chip{i}", "image": image, "scene_type": "target", "caption": caption,
          "keywords": KEYWORDS, "geo": dict(GEO), **extra}


def manifest(folder, entries, name="manifest.jsonl"):
  path = folder / name
  path.write_text("".join(json.dumps(e) + "\n" for e in entries))
  return str(path)
