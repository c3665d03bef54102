"""The model card of an export (OUT/README.md) and the YAML metadata of every README in it,
written from the workdir's facts: the exported step, the temperature, the dataset's metadata,
which captioner was exported, and the benchmark's results.json with its chance levels.

Nothing here is a hand-written number: a fact the workdir does not have (no results.json, an
ingested dataset without synthetic settings) is said to be missing instead.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import yaml

from klip_jax import config as config_lib
from klip_jax.data.tokenizer import TokenIds

_PIPELINE = {"card": "image-to-text", "captioning": "image-to-text", "retrieval": "zero-shot-image-classification"}
_TAGS = ["blip", "klip_jax", "fusar-klip", "sar", "synthetic-aperture-radar", "remote-sensing"]
# results.json task -> Hugging Face metric ids its numbers are.
_METRIC_IDS = {"retrieval": ["recall"], "captioning": ["bleu", "cider"], "itm": ["roc_auc", "accuracy"],
               "zeroshot_landcover": ["accuracy"], "segmentation": ["mean_iou"], "detection": ["map"],
               "target_classification": ["accuracy"], "positioning": ["accuracy"], "screening": ["roc_auc"]}
# Bookkeeping entries of a task's results, not scores.
_NOT_SCORES = ("num_", "beam_size", "finetune_", "skipped")


@dataclasses.dataclass
class Facts:
  """What the card says, all read from the workdir."""

  workdir: str
  step: int
  config: ml_collections.ConfigDict
  tokens: TokenIds
  temperature: float
  db_stats: tuple[float, float] | None
  dataset: dict  # the dataset builder's metadata
  captioner: dict  # commands._captioner
  results: dict | None  # WORKDIR/eval/results.json


def front_matter(kind: str, results: dict | None = None) -> str:
  """YAML metadata for the Hub: `kind` is "card" (OUT/README.md), "retrieval" or "captioning";
  the metrics are those of the benchmark's tasks that `kind` answers (captioning: captioning)."""
  tasks = {name: task for name, task in (results or {}).get("tasks", {}).items()
           if kind == "card" or (name == "captioning") == (kind == "captioning")}
  meta = {"library_name": "transformers", "pipeline_tag": _PIPELINE[kind],
          "tags": _TAGS + {"retrieval": ["image-text-retrieval"], "captioning": ["image-captioning"]}.get(
              kind, ["image-text-retrieval", "image-captioning"]),
          "datasets": ["klip_sar"]}
  metrics = sorted({m for task in tasks if "skipped" not in tasks[task] for m in _METRIC_IDS.get(task, [])})
  if metrics:
    meta["metrics"] = metrics
  return ("---\n# license: klip_jax does not choose a license for your weights; set the one you publish them "
          "under (https://huggingface.co/docs/hub/repositories-licenses)\nlicense: unknown\n"
          + yaml.safe_dump(meta, sort_keys=False) + "---\n")


def _chance(task: dict, metric: str) -> float | None:
  """The chance level of `metric` (chance_<metric>, or chance_<score> for greedy_/beam_<score>)."""
  for key in (f"chance_{metric}", f"chance_{metric.split('_', 1)[-1]}"):
    if key in task:
      return task[key]
  return None


def _number(x) -> str:
  return "" if x is None else f"{x:.3f}"


def results_table(results: dict) -> str:
  """Every score of results.json beside the random-init model and the chance level."""
  rows = ["| task | metric | this model | random init | chance |", "|---|---|---|---|---|"]
  random_init = results.get("random_init", {})
  for name, task in results["tasks"].items():
    if "skipped" in task:
      rows.append(f"| {name} | skipped: {results.get('skipped', {}).get(name, 'no ground truth')} | | | |")
      continue
    for metric, value in task.items():
      if metric.startswith("chance_") or metric.startswith(_NOT_SCORES):
        continue
      rows.append(f"| {name} | {metric} | {_number(value)} | {_number(random_init.get(name, {}).get(metric))} "
                  f"| {_number(_chance(task, metric))} |")
  differ = config_lib.differences(results.get("settings", {}))
  if differ:  # merged from several `klip eval` runs
    rows += ["", "Not all tasks were evaluated with the same settings: " + "; ".join(differ) + "."]
  return "\n".join(rows)


def _dataset(facts: Facts) -> str:
  settings = facts.dataset.get("settings", {})
  if "world" in settings:
    sizes = ", ".join(f"{n} {split}" for split, n in settings["num_examples"].items())
    return (f"klip_jax's embedded synthetic SAR world (seed {settings['seed']}, {sizes} chips of "
            f"{settings['world']['image_size']} px, {settings['noise_rate']:.0%} of caption clauses corrupted "
            "on purpose: the noise SCIO is trained to find)")
  return "SAR chips ingested with `klip data ingest` (the run's dataset folder: " \
         f"`{facts.config.data.data_dir or facts.workdir + '/data'}`)"


def model_card(facts: Facts) -> str:
  """OUT/README.md."""
  c, t = facts.config, facts.tokens
  size = c.model.vision.image_size
  if facts.results is None:
    scores = (f"{facts.workdir} has no eval/results.json: run `klip eval --workdir {facts.workdir}` before "
              "exporting to have the benchmark's numbers here.")
  else:
    same = "" if facts.results["step"] == facts.step else (
        f" **They are of step {facts.results['step']}, not the exported step {facts.step}.**")
    scores = (f"`klip eval` on the held-out test split (step {facts.results['step']}), beside a randomly "
              f"initialised model of the same config and the chance (or majority) level.{same}\n\n"
              + results_table(facts.results))
  synthetic = ("the world is procedurally generated (terrain, targets, speckle, geo metadata from a gazetteer), "
               "with templated captions; numbers on real SAR will differ"
               if "world" in facts.dataset.get("settings", {}) else "trained on this run's ingested chips only")
  db = ("the training set's dB statistics (builder metadata) were not recorded" if facts.db_stats is None else
        f"dB mean {facts.db_stats[0]:.6f}, std {facts.db_stats[1]:.6f} (the training split's)")
  return f"""{front_matter("card", facts.results)}
# FUSAR-KLIP (klip_jax) SAR vision-language models, step {facts.step}

BLIP-architecture models pretrained by klip_jax (FUSAR-KLIP: ITC + ITM with hard negatives +
masked-keyword reconstruction, with SCIO caption relabelling) from `{facts.workdir}`, exported for
Hugging Face `transformers` (PyTorch; no JAX needed):

- `retrieval/`: `BlipForImageTextRetrieval`: image-text similarity (ITC) and matching (ITM).
- `captioning/`: `BlipForConditionalGeneration`: {facts.captioner["note"]}.

## Intended use
Research on SAR image-text retrieval, captioning and matching; a starting point for fine-tuning on
SAR data. Not for operational or safety-relevant decisions (see Limitations).

## How to load
Each folder's README.md has the full recipe (tokenisation with the shipped sentencepiece
`tokenizer.model`, SAR normalisation). In short:

```python
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval
retrieval = BlipForImageTextRetrieval.from_pretrained("retrieval")
captioner = BlipForConditionalGeneration.from_pretrained("captioning", trust_remote_code=True)
ids = captioner.generate(pixel_values=pixels)  # our decoding rule, from generation_config.json
```
`trust_remote_code` runs `captioning/custom_generate/generate.py` (3 lines) so that `generate()`
follows `generation_config.json` (greedy from [DEC]={t.dec} to [SEP]={t.sep}, at most {c.data.max_len} tokens,
never [PAD]={t.pad} [DEC]={t.dec} [CLS]={t.cls} [ENC]={t.enc} [MASK]={t.mask}); transformers does not hand a
folder's generation config to BLIP's text decoder by itself. Without remote code, set
`captioner.text_decoder.generation_config = captioner.generation_config` after loading.
The ITC temperature is {facts.temperature:.6f}: `config.json`'s `logit_scale_init_value` is
log(1 / temperature), so contrastive logits are cosine * exp(logit_scale) = cosine / {facts.temperature:.6f}.

## Reading images from our datasets
Records (`klip_jax/data/records.py`) hold `image` as bytes: a 16-bit greyscale PNG of uint16 SAR
amplitude (synthetic world, integer chips), or `.npy` bytes of float32 amplitude (calibrated
data; NaN = no data). Decode with
`np.array(PIL.Image.open(io.BytesIO(data)))` (PNG; keeps uint16) or
`np.load(io.BytesIO(data), allow_pickle=False)` (bytes starting with `\\x93NUMPY`). The models take
the amplitude in dB standardised with {db}, {size}x{size} pixels, replicated to 3 channels.

## Training data and the noisy-caption caveat
Trained on {_dataset(facts)}. A record's `caption` field is the caption the model was TRAINED
on, noisy clauses included: do not use it as ground truth. The true
caption is `caption` with the keyword of each clause listed in `truth.corrupted` replaced by the
matching entry of `truth.true_keywords` (the clause's keyword span is `spans[k]`;
`klip_jax.data.records.true_text` does it). The benchmark below scores against the true captions.

## Evaluation
{scores}

## Limitations
- Data: {synthetic}.
- Size: ViT width x depth {c.model.vision.width}x{c.model.vision.depth} at {size} px, text
  {c.model.text.width}x{c.model.text.depth}, {c.data.max_len} tokens, a {t.vocab_size}-piece vocabulary; a small model
  on templated captions can learn the template more than the image (compare with the random-init
  and chance columns above).
- The learned ITC temperature ({facts.temperature:.6f}, clipped to {tuple(c.model.temp_range)}) makes
  softmaxed similarities very peaked; rank by cosine when calibrated probabilities are not needed.
- Single-channel input: the 3 RGB channels must be the same grey image (the patch embedding holds a
  third of the single-channel kernel per channel); anything else changes the features.
- Text is our sentencepiece model, not a BERT tokenizer; captions follow the HCoT clause template
  joined by "$".
"""
