"""Target detection probe (benchmark task 6b): a CenterNet-style head on frozen ViT patch tokens.

The head is trained on the train split's patch-token grids and scored on the test split with
COCO mAP@0.5 (pycocotools). It is deliberately light, a per-token MLP (a 3x3 conv head overfit
small train splits badly), so the score measures what each frozen token already says about the
targets; an image-blind prior detector gives the chance level reported next to it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.special import expit
from tqdm import tqdm

from klip_jax.data import pipeline

log = logging.getLogger(__name__)

HIDDEN = 128
COCO_MAX_DETS = 100  # COCOeval's per-image, per-class cap for stats[1]
_HEAT_PRIOR_BIAS = -math.log((1 - 0.1) / 0.1)  # CenterNet: start every heatmap cell at p = 0.1


def map_at_50(gt_boxes: list[np.ndarray], gt_classes: list[np.ndarray], det_boxes: list[np.ndarray],
              det_classes: list[np.ndarray], det_scores: list[np.ndarray], image_size: int) -> float:
  """COCO bbox AP at IoU 0.5 (COCOeval stats[1]: all areas, <= 100 detections per image and class).

  Per-image lists; boxes are (x0, y0, x1, y1) pixels with exclusive upper bounds. AP is the
  mean over classes that have ground truth; detections of other classes are ignored, and false
  positives on images without ground truth count. Returns 0.0 with no detections and NaN when
  there is no ground-truth box at all.
  """
  images = [{"id": i + 1, "width": image_size, "height": image_size} for i in range(len(gt_boxes))]
  gt, dets = [], []
  for i, (boxes, classes) in enumerate(zip(gt_boxes, gt_classes)):
    for box, cls in zip(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(classes).reshape(-1)):
      w, h = box[2] - box[0], box[3] - box[1]
      # COCOeval treats a matched gt id of 0 as "unmatched", so ids start at 1.
      gt.append({"id": len(gt) + 1, "image_id": i + 1, "category_id": int(cls) + 1, "iscrowd": 0,
                 "bbox": [float(box[0]), float(box[1]), float(w), float(h)], "area": float(w * h)})
  for i, (boxes, classes, scores) in enumerate(zip(det_boxes, det_classes, det_scores)):
    for box, cls, score in zip(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(classes).reshape(-1),
                               np.asarray(scores).reshape(-1)):
      dets.append({"image_id": i + 1, "category_id": int(cls) + 1, "score": float(score),
                   "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
  if not gt:
    return float("nan")
  if not dets:
    return 0.0
  categories = sorted({a["category_id"] for a in gt} | {d["category_id"] for d in dets})
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": gt, "categories": [{"id": c} for c in categories]}
    coco_gt.createIndex()
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return float(evaluator.stats[1])


def _gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
  """CenterNet's radius rule (CornerNet's `gaussian_radius`, as in the reference code)."""
  b1 = height + width
  c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
  r1 = (b1 + math.sqrt(b1 ** 2 - 4 * c1)) / 2
  b2 = 2 * (height + width)
  c2 = (1 - min_overlap) * width * height
  r2 = (b2 + math.sqrt(b2 ** 2 - 16 * c2)) / 2
  a3 = 4 * min_overlap
  b3 = -2 * min_overlap * (height + width)
  c3 = (min_overlap - 1) * width * height
  r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
  return min(r1, r2, r3)


def _centres(boxes: np.ndarray, grid: int, cell: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Centre cell (row, col) [n, 2], in-cell offset (x, y) [n, 2] and size (w, h) in cells [n, 2]."""
  centre = np.stack([boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]], axis=1) / (2 * cell)
  col_row = np.clip(np.floor(centre), 0, grid - 1).astype(np.int64)
  size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1) / cell
  return col_row[:, ::-1], np.clip(centre - col_row, 0, 1), size


def targets(boxes: list[np.ndarray], classes: list[np.ndarray], *, grid: int, image_size: int,
            num_classes: int) -> dict[str, np.ndarray]:
  """CenterNet training targets on the token grid.

  heat [N, g, g, C]: a Gaussian splat per box (radius by CenterNet's rule, in cells), exactly 1
  at the box's centre cell. size [N, g, g, 2]: log (w, h) in cells; offset [N, g, g, 2]: centre
  position within its cell in [0, 1]; mask [N, g, g]: 1 at centre cells. When boxes share a
  centre cell, size and offset come from the larger box (both classes keep their heat peak).
  """
  n, cell = len(boxes), image_size / grid
  heat = np.zeros((n, grid, grid, num_classes), np.float32)
  size = np.zeros((n, grid, grid, 2), np.float32)
  offset = np.zeros((n, grid, grid, 2), np.float32)
  mask = np.zeros((n, grid, grid), np.float32)
  area = np.zeros((n, grid, grid))
  ys, xs = np.mgrid[0:grid, 0:grid]
  for i, (box_i, cls_i) in enumerate(zip(boxes, classes)):
    box_i = np.asarray(box_i, np.float64).reshape(-1, 4)
    rows_cols, offs, sizes = _centres(box_i, grid, cell)
    for (row, col), off, wh, cls in zip(rows_cols, offs, sizes, np.asarray(cls_i).reshape(-1)):
      radius = max(0, int(_gaussian_radius(wh[1], wh[0])))
      sigma = (2 * radius + 1) / 6
      splat = np.exp(-((xs - col) ** 2 + (ys - row) ** 2) / (2 * sigma ** 2))
      splat[(np.abs(xs - col) > radius) | (np.abs(ys - row) > radius)] = 0.0
      splat[row, col] = 1.0
      heat[i, :, :, cls] = np.maximum(heat[i, :, :, cls], splat)
      if wh[0] * wh[1] > area[i, row, col]:
        area[i, row, col] = wh[0] * wh[1]
        size[i, row, col] = np.log(wh)
        offset[i, row, col] = off
        mask[i, row, col] = 1.0
  return {"heat": heat, "size": size, "offset": offset, "mask": mask}


def init_params(key: jax.Array, dim: int, num_classes: int) -> dict[str, jax.Array]:
  """Per-cell MLP: dim -> HIDDEN (relu, He init) -> num_classes + 4."""
  k_hidden, k_out = jax.random.split(key)
  return {
      "hidden_w": jax.random.normal(k_hidden, (dim, HIDDEN)) * math.sqrt(2 / dim),
      "hidden_b": jnp.zeros((HIDDEN,)),
      "out_w": jax.random.normal(k_out, (HIDDEN, num_classes + 4)) * 0.01,
      "out_b": jnp.zeros((num_classes + 4,)).at[:num_classes].set(_HEAT_PRIOR_BIAS),
  }


def apply(params: dict[str, jax.Array], tokens: jax.Array) -> jax.Array:
  """Head outputs [..., C + 4] per token: heat logits, log size (w, h) in cells, offset logits (x, y)."""
  hidden = jax.nn.relu(tokens @ params["hidden_w"] + params["hidden_b"])
  return hidden @ params["out_w"] + params["out_b"]


def loss_fn(params: dict[str, jax.Array], tokens: jax.Array, target: dict[str, jax.Array]) -> jax.Array:
  """Penalty-reduced focal loss (alpha 2, beta 4) per heat peak + L1 on size and offset at centres."""
  out = apply(params, tokens)
  num_classes = target["heat"].shape[-1]
  logits, heat = out[..., :num_classes], target["heat"]
  p, pos = jax.nn.sigmoid(logits), heat == 1.0
  pos_term = jnp.where(pos, (1 - p) ** 2 * jax.nn.log_sigmoid(logits), 0.0)
  neg_term = jnp.where(pos, 0.0, (1 - heat) ** 4 * p ** 2 * jax.nn.log_sigmoid(-logits))
  focal = -(pos_term.sum() + neg_term.sum()) / jnp.maximum(pos.sum(), 1)
  mask = target["mask"][..., None]
  size_l1 = jnp.abs(out[..., num_classes:num_classes + 2] - target["size"]) * mask
  offset_l1 = jnp.abs(jax.nn.sigmoid(out[..., num_classes + 2:]) - target["offset"]) * mask
  return focal + (size_l1.sum() + offset_l1.sum()) / jnp.maximum(mask.sum(), 1)


def decode(outputs: np.ndarray, *, image_size: int, num_classes: int,
           max_detections: int = 20) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
  """Head outputs [N, g, g, C + 4] -> per-image (boxes [k, 4] xyxy px, classes [k], scores [k]).

  Sigmoid heatmap, 3x3 local-max suppression per class, then the top `max_detections`
  (cell, class) peaks by score; boxes are clipped to the image.
  """
  outputs = np.asarray(outputs, np.float64)
  n, grid = outputs.shape[0], outputs.shape[1]
  cell = image_size / grid
  heat = expit(outputs[..., :num_classes])
  padded = np.pad(heat, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  pooled = np.max([padded[:, dy:dy + grid, dx:dx + grid] for dy in range(3) for dx in range(3)], axis=0)
  peak = heat == pooled
  size = np.exp(np.clip(outputs[..., num_classes:num_classes + 2], -10, 10)) * cell
  offset = expit(outputs[..., num_classes + 2:])
  all_boxes, all_classes, all_scores = [], [], []
  for i in range(n):
    flat = np.where(peak[i], heat[i], -1.0).reshape(-1)  # index = (row * g + col) * C + class
    order = np.argsort(-flat, kind="stable")[:max_detections]
    order = order[flat[order] >= 0]
    rows, cols, cls = order // (grid * num_classes), (order // num_classes) % grid, order % num_classes
    cx = (cols + offset[i, rows, cols, 0]) * cell
    cy = (rows + offset[i, rows, cols, 1]) * cell
    w, h = size[i, rows, cols, 0], size[i, rows, cols, 1]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    all_boxes.append(np.clip(boxes, 0, image_size).astype(np.float32))
    all_classes.append(cls.astype(np.int64))
    all_scores.append(flat[order].astype(np.float32))
  return all_boxes, all_classes, all_scores


def chance_detections(train_boxes: list[np.ndarray], train_classes: list[np.ndarray], num_images: int, *,
                      grid: int, image_size: int,
                      num_classes: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
  """The image-blind detector behind `chance_map50`, identical for every image.

  At every grid-cell centre and for every class seen in training, a box of the class's mean
  train size. Score = P(class) * P(cell | class) from the train split (Laplace-smoothed), so the
  ranking carries no image information; the cell prior only orders the otherwise tied cells of
  a class (COCOeval ranks each class separately). Each class keeps its COCO_MAX_DETS best cells,
  which is all COCOeval would score anyway.
  """
  cell = image_size / grid
  counts = np.zeros((num_classes, grid, grid))
  wh_sum = np.zeros((num_classes, 2))
  for boxes, classes in zip(train_boxes, train_classes):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    classes = np.asarray(classes).reshape(-1)
    rows_cols, _, sizes = _centres(boxes, grid, cell)
    np.add.at(counts, (classes, rows_cols[:, 0], rows_cols[:, 1]), 1)
    np.add.at(wh_sum, classes, sizes * cell)
  per_class = counts.sum(axis=(1, 2))
  boxes, classes, scores = [], [], []
  for c in np.flatnonzero(per_class):
    w, h = wh_sum[c] / per_class[c]
    cell_prior = (counts[c] + 1) / (per_class[c] + grid * grid)
    score = (per_class[c] / per_class.sum() * cell_prior).reshape(-1)
    keep = np.argsort(-score, kind="stable")[:COCO_MAX_DETS]
    cx, cy = (keep % grid + 0.5) * cell, (keep // grid + 0.5) * cell
    boxes.append(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1))
    classes.append(np.full(len(keep), c))
    scores.append(score[keep])
  one = (np.clip(np.concatenate(boxes), 0, image_size), np.concatenate(classes), np.concatenate(scores))
  return [one[0]] * num_images, [one[1]] * num_images, [one[2]] * num_images


def _check_split(name: str, tokens: np.ndarray, boxes: list[np.ndarray], classes: list[np.ndarray],
                 num_classes: int) -> None:
  if tokens.ndim != 4 or tokens.shape[1] != tokens.shape[2]:
    raise ValueError(f"{name}_tokens must be [N, g, g, D], got shape {tokens.shape}")
  if not len(tokens) == len(boxes) == len(classes):
    raise ValueError(f"{name} split: {len(tokens)} token grids but {len(boxes)} box lists and "
                     f"{len(classes)} class lists; give one entry per image")
  for i, (b, c) in enumerate(zip(boxes, classes)):
    b, c = np.asarray(b).reshape(-1, 4), np.asarray(c).reshape(-1)
    if len(b) != len(c):
      raise ValueError(f"{name} image {i}: {len(b)} boxes but {len(c)} classes")
    if np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1]):
      raise ValueError(f"{name} image {i}: boxes need x1 > x0 and y1 > y0 (x0, y0, x1, y1 pixels)")
    if np.any((c < 0) | (c >= num_classes)):
      raise ValueError(f"{name} image {i}: classes must be in [0, {num_classes}), got {c.tolist()}")


def _predict(params, tokens: np.ndarray, batch_size: int) -> np.ndarray:
  """Head outputs for all tokens, in fixed-size (padded) chunks so jit compiles once."""
  run = jax.jit(apply)
  outs = []
  for start in range(0, len(tokens), batch_size):
    chunk = tokens[start:start + batch_size]
    outs.append(np.asarray(run(params, pipeline.pad_rows(chunk, batch_size)))[:len(chunk)])
  return np.concatenate(outs)


def evaluate(train_tokens: np.ndarray, train_boxes: list[np.ndarray], train_classes: list[np.ndarray],
             test_tokens: np.ndarray, test_boxes: list[np.ndarray], test_classes: list[np.ndarray], *,
             image_size: int, num_classes: int, steps: int = 500, seed: int = 0,
             learning_rate: float = 1e-2, batch_size: int = 64, max_detections: int = 20) -> dict:
  """Train the head on the train split's frozen tokens; mAP@0.5 of it and of chance on test.

  Returns map50, chance_map50, num_test_images, num_test_boxes and final_loss (the loss of the
  last training minibatch). A test split without any ground-truth box gives NaN for both mAPs
  (and num_test_boxes 0). Raises ValueError when the train split has no box.
  """
  train_tokens, test_tokens = np.asarray(train_tokens, np.float32), np.asarray(test_tokens, np.float32)
  _check_split("train", train_tokens, train_boxes, train_classes, num_classes)
  _check_split("test", test_tokens, test_boxes, test_classes, num_classes)
  if train_tokens.shape[1:] != test_tokens.shape[1:]:
    raise ValueError(f"train and test token grids differ: {train_tokens.shape[1:]} vs {test_tokens.shape[1:]}")
  if sum(np.asarray(c).size for c in train_classes) == 0:
    raise ValueError("detection needs target boxes in the train split, but it has none")
  grid, dim = train_tokens.shape[1], train_tokens.shape[3]

  mean = train_tokens.mean(axis=(0, 1, 2))
  std = train_tokens.std(axis=(0, 1, 2)) + 1e-6
  train_x = jnp.asarray((train_tokens - mean) / std)
  target = {k: jnp.asarray(v) for k, v in targets(train_boxes, train_classes, grid=grid, image_size=image_size,
                                                   num_classes=num_classes).items()}

  optimizer = optax.adamw(learning_rate)
  params = init_params(jax.random.key(seed), dim, num_classes)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, x, target, idx):
    loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], jax.tree.map(lambda t: t[idx], target))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  n, batch = len(train_x), min(batch_size, len(train_x))
  loss = jnp.nan
  for _ in tqdm(range(steps), desc="detection head", unit="step", leave=False):
    params, opt_state, loss = train_step(params, opt_state, train_x, target, rng.choice(n, batch, replace=False))
  final_loss = float(loss)

  num_test_boxes = int(sum(np.asarray(c).size for c in test_classes))
  if num_test_boxes == 0:
    log.warning("detection: the test split has no ground-truth box; mAP is undefined (NaN)")
    map50 = chance = float("nan")
  else:
    outputs = _predict(params, (test_tokens - mean) / std, batch)
    dets = decode(outputs, image_size=image_size, num_classes=num_classes, max_detections=max_detections)
    map50 = map_at_50(test_boxes, test_classes, *dets, image_size)
    chance_dets = chance_detections(train_boxes, train_classes, len(test_tokens), grid=grid,
                                    image_size=image_size, num_classes=num_classes)
    chance = map_at_50(test_boxes, test_classes, *chance_dets, image_size)
  log.info("detection: map50 %.4f (chance %.4f), final loss %.4f", map50, chance, final_loss)
  return {"map50": map50, "chance_map50": chance, "num_test_images": len(test_tokens),
          "num_test_boxes": num_test_boxes, "final_loss": final_loss}
