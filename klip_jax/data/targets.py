"""Targets of the synthetic SAR world: ship and aircraft classes and where they are placed.

Ships go on water and aircraft on aprons, in one of TARGET_PATTERNS (single, row, cluster,
scattered), without overlaps and fully inside the chip, so every Target's class, centre, size,
heading and box is exact ground truth. The dominant point scatterers of each class live here
too: they are part of what a target is, and radar image formation only renders them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from klip_jax.data.terrain import RUNWAY, WATER


@dataclasses.dataclass(frozen=True)
class TargetClass:
  name: str
  plural: str
  category: str  # "ship" or "aircraft"
  length_m: tuple[float, float]
  width_ratio: float  # beam / length for ships, wing span / length for aircraft


TARGET_CLASSES = (
    TargetClass("fishing boat", "fishing boats", "ship", (12.0, 35.0), 0.22),
    TargetClass("cargo ship", "cargo ships", "ship", (90.0, 200.0), 0.15),
    TargetClass("tanker", "tankers", "ship", (210.0, 330.0), 0.17),
    TargetClass("fighter jet", "fighter jets", "aircraft", (14.0, 22.0), 0.7),
    TargetClass("transport aircraft", "transport aircraft", "aircraft", (24.0, 34.0), 1.3),
    TargetClass("airliner", "airliners", "aircraft", (36.0, 75.0), 0.95),
)
TARGET_PATTERNS = ("single", "row", "cluster", "scattered")


@dataclasses.dataclass
class Target:
  cls: int  # index into TARGET_CLASSES
  center_xy: tuple[float, float]  # pixels
  length_m: float
  width_m: float
  heading_deg: float
  box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, exclusive upper bounds



def _target_footprint(cls: TargetClass, length_px: float, width_px: float, heading_rad: float,
                      dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
  """Which pixels (given by offsets from the target centre) the target covers."""
  along = dx * np.sin(heading_rad) - dy * np.cos(heading_rad)
  across = dx * np.cos(heading_rad) + dy * np.sin(heading_rad)
  half = length_px / 2
  if cls.category == "ship":
    # A hull of constant beam that tapers to the bow over its front fifth.
    taper = np.clip((half - along) / (0.2 * length_px), 0, 1)
    return (np.abs(along) <= half) & (np.abs(across) <= np.maximum(width_px / 2 * taper, 0.5))
  fuselage = (np.abs(along) <= half) & (np.abs(across) <= max(length_px / 20, 0.5))
  wing = (np.abs(along - 0.05 * length_px) <= max(length_px / 10, 0.5)) & (np.abs(across) <= width_px / 2)
  tail = (np.abs(along + 0.42 * length_px) <= max(length_px / 20, 0.5)) & (np.abs(across) <= width_px / 6)
  return fuselage | wing | tail


def scatterer_offsets(cls: TargetClass, length_m: float, width_m: float, rng) -> list[tuple[float, float, float]]:
  """(along_m, across_m, relative_dB) of a target's dominant point scatterers."""
  half = length_m / 2
  if cls.category == "ship":
    points = [(0.45 * half, 0.0, 0.0), (-0.9 * half, 0.0, -3.0)]  # superstructure, stern
    points += [(rng.uniform(-0.7, 0.8) * half, 0.0, rng.uniform(-8, -3)) for _ in range(rng.integers(1, 4))]
    return points
  return [(half, 0.0, -4.0), (-0.9 * half, 0.0, -2.0),            # nose, tail fin
          (0.05 * length_m, 0.25 * width_m, -1.0), (0.05 * length_m, -0.25 * width_m, -1.0),  # engines
          (0.0, 0.0, 0.0)]                                        # wing root


def _pattern_centers(rng, pattern: str, n: int, size: int, spacing_px: float) -> np.ndarray:
  if pattern == "row":
    start = rng.uniform(0.15, 0.85, 2) * size
    direction = rng.uniform(0, 2 * np.pi)
    step = spacing_px * np.array([np.cos(direction), np.sin(direction)])
    return start + (np.arange(n * 4)[:, None] - n / 2) * step
  if pattern == "cluster":
    center = rng.uniform(0.25, 0.75, 2) * size
    return center + rng.normal(0, 1.2 * spacing_px + 0.04 * size, (n * 20, 2))
  return rng.uniform(0, size, (n * 20, 2))


def place_targets(rng, lc: np.ndarray, res: float, category: str, max_targets: int):
  """Place ships on water or aircraft on aprons, without overlaps and inside the chip."""
  size = lc.shape[0]
  allowed = lc == (WATER if category == "ship" else RUNWAY)
  choices = [i for i, c in enumerate(TARGET_CLASSES) if c.category == category
             and c.length_m[1] / res <= 0.6 * size and c.length_m[0] / res >= 3]
  if not choices or allowed.mean() < 0.05:
    return [], "single", np.zeros((size, size), bool)
  main = int(rng.choice(choices))
  n = int(rng.integers(1, max_targets + 1))
  pattern = "single" if n == 1 else str(rng.choice(TARGET_PATTERNS[1:]))
  heading = rng.uniform(0, 360)
  spacing = 1.3 * TARGET_CLASSES[main].length_m[1] / res
  occupied = np.zeros((size, size), bool)
  targets = []
  for cx, cy in _pattern_centers(rng, pattern, n, size, spacing):
    if len(targets) == n:
      break
    cls_idx = main if rng.uniform() < 0.85 else int(rng.choice(choices))
    cls = TARGET_CLASSES[cls_idx]
    length_m = rng.uniform(*cls.length_m)
    width_m = length_m * cls.width_ratio
    h = (heading if pattern == "row" else (heading + rng.normal(0, 20)) % 360 if pattern == "cluster"
         else rng.uniform(0, 360))
    length_px, width_px = length_m / res, width_m / res
    r = int(np.ceil(max(length_px, width_px) / 2)) + 2
    x0, y0 = int(np.floor(cx)) - r, int(np.floor(cy)) - r
    if x0 < 1 or y0 < 1 or x0 + 2 * r + 1 > size - 1 or y0 + 2 * r + 1 > size - 1:
      continue
    yy, xx = np.mgrid[y0:y0 + 2 * r + 1, x0:x0 + 2 * r + 1]
    foot = _target_footprint(cls, length_px, width_px, np.deg2rad(h), xx + 0.5 - cx, yy + 0.5 - cy)
    if not foot.any():
      continue
    window = (slice(y0, y0 + 2 * r + 1), slice(x0, x0 + 2 * r + 1))
    if allowed[window][foot].mean() < 0.95 or occupied[window][foot].any():
      continue
    occupied[window] |= foot
    fy, fx = np.nonzero(foot)
    box = (int(x0 + fx.min()), int(y0 + fy.min()), int(x0 + fx.max() + 1), int(y0 + fy.max() + 1))
    targets.append(Target(cls_idx, (float(cx), float(cy)), float(length_m), float(width_m), float(h), box))
  if len(targets) == 1:
    pattern = "single"
  return targets, pattern, occupied
