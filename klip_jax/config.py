"""The run configuration: defaults, validation, and loading `configs/*.py` files.

A config file defines `get_config(arg=None) -> ConfigDict`, usually by calling
`default_config()` and changing what differs (see configs/tiny.py); `arg` selects a variant
(`--config=configs/demo.py:offline`). Every field can be overridden from the command line as
`--config.train.steps=100`. `validate` fails early with a message that names the field.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from klip_jax.data import knowledge
from klip_jax.errors import ConfigError, KlipError

# The shipped configs (the repository's configs/, installed as klip_jax.configs), found from
# any working directory.
CONFIG_DIR = os.path.dirname(importlib.util.find_spec("klip_jax.configs").origin)

# Logical axis -> mesh axes (MaxText style). Parameters: embed is FSDP-sharded, mlp/heads/vocab
# tensor-parallel; activations keep the batch on (data, fsdp).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),  # the stacked-layer axis of scanned towers
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
)


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      dtype="float32",  # compute dtype ("bfloat16" on TPU)
      param_dtype="float32",
      embed_dim=256,
      temp_init=0.07,
      temp_range=(0.001, 0.5),
      share_decoder=True,  # decoder shares all but self-attention with the encoder (BLIP)
      # attention: "xla" (XLA's products and softmax, any backend), "cudnn" (cuDNN's fused
      # attention: NVIDIA GPUs, bfloat16 only) or "auto" (cuDNN where it runs, else XLA).
      vision=dict(image_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072,
                  ln_eps=1e-5, approximate_gelu=False, fused_qkv=True, remat="none",
                  scan_layers=False, init_std=0.02, attention="auto"),
      text=dict(width=768, depth=12, heads=12, mlp_dim=3072, max_len=512, ln_eps=1e-12,
                approximate_gelu=False, remat="none", scan_layers=False, init_std=0.02, attention="auto"),
  ))
  c.momentum = ml_collections.ConfigDict(dict(
      enabled=True, decay=0.995, queue_size=57600, alpha=0.4, alpha_warmup_steps=1000))
  c.loss = ml_collections.ConfigDict(dict(
      itc=1.0, itm=1.0, recon=1.0, mask_prob=0.5, random_prob=0.1, extra_mask_rate=0.0,
      # Also reconstruct the token after each keyword, so the decoder learns where a keyword
      # ends and proofreading can write one of another length (off: the paper's loss exactly).
      keyword_end=True,
      # Extension: the share of ITM negatives drawn uniformly from the batch instead of by ITC
      # similarity (0: BLIP's hard negatives only). On templated captions with noisy clauses the
      # hardest negative is often as true of the image as the positive, and ITM stays at its prior.
      itm_random_negatives=0.0))
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-4, end_lr_ratio=0.01, warmup_steps=1000, weight_decay=0.05, b1=0.9, b2=0.999,
      grad_clip=1.0, grad_accum=1))
  c.train = ml_collections.ConfigDict(dict(
      steps=100000, batch_size=256, log_every=50, ckpt_every=1000, keep=3))
  c.data = ml_collections.ConfigDict(dict(
      data_dir="",  # empty: synthesise the embedded world into WORKDIR/data
      tokenizer="",  # empty: WORKDIR/tokenizer.model, trained on the train split if missing
      vocab_size=2000,
      max_len=180,
      # Input pipeline parallelism. The per-example work (decode, augment, tokenise) is Python
      # holding the GIL, so one read thread overlaps it with the train step and more threads only
      # contend for the GIL (tiny config: 1000 examples/s with 1 thread, 710 with 2, 630 with 4);
      # scale it with worker processes (grain's multiprocessing prefetch) instead.
      worker_count=0,
      read_threads=1,
      flip=True,
      gain_jitter_db=1.0,
      # Extensions beyond the paper (off: the paper's method). clause_negatives: each caption's
      # one-clause-wrong copy is an extra ITM negative of its image; clause_dropout: the share of
      # captions trained with one clause removed (SCIO's screening variants in distribution).
      clause_negatives=False,
      clause_dropout=0.0,
      # Train on the first N chips of the train split only (0: all of it): nested subsets of one
      # dataset, so runs differ only in how much data they see (`klip sweep`'s data-size axis).
      train_examples=0,
      synth=dict(num_train=20000, num_val=1000, num_test=1000, noise_rate=0.2, seed=0,
                 image_size=224, resolution_min=1.0, resolution_max=10.0, looks=4),
  ))
  # Self-Consistent Iterative Optimization: stage A (all losses on the original caption), B
  # (reconstruction on the caption minus the flagged clauses), C (all losses on the corrected
  # caption, plus extra random masking). Stage lengths are train steps; they sum to train.steps
  # in `klip pretrain`.
  c.scio = ml_collections.ConfigDict(dict(
      mode="online",  # "online": relabel each batch before its step; "offline": whole split per stage
      stage_a_steps=0, stage_b_steps=0, stage_c_steps=0,
      stage_c_extra_mask_rate=0.05,
      max_clauses=8,
      max_fill=24,  # keyword tokens written at most per rewrite (the decoder ends it sooner)
      relabel_batch_size=64,
      # Screening. "paper": flag a clause when removing it raises both ITC and ITM above the
      # original's (the best such ITC wins). "relative" (an extension): score each removal's
      # ITC and ITM gains against the caption's other removals (z-units, averaged over the two
      # signals) and flag the top clause when its score exceeds `threshold`. "decoder" (an
      # extension): flag the clause whose keyword the image-grounded decoder finds most
      # surprising (-log p, in z-units of its field or, uncalibrated, of its caption) when that
      # exceeds `threshold`.
      rule="paper",
      threshold=1.0,
      # Extension: flag up to this many clauses per caption per round (the paper flags one), the
      # best-scoring first, each only above the rule's bar; each flagged keyword is rewritten.
      max_flags=1,
      # Extension: standardise each gain by its field's mean and spread over the relabel batch
      # before the rule, so fields whose removal always moves the scores do not crowd out others.
      field_calibration=False,
      # Extension: a flagged keyword whose field has at most `max_candidates` distinct values in
      # the train split is rewritten to the one (its current value included) the decoder finds
      # most likely in place; other fields are generated freely.
      candidates=False,
      max_candidates=16,
      # Extension: HCoT fields screening never flags, as "scene_type.field" names, comma-separated:
      # fields the model cannot read (no image shows a target scene's city), whose flags are noise.
      skip_fields="",
      # Extension: a rewrite replaces the flagged keyword only when the decoder finds it more
      # than `keep_margin` nats likelier in place than the keyword as written (0: always).
      keep_margin=0.0,
      # Extension: a flagged clause is rewritten only when its score reaches this bar (the units
      # of `threshold`: field-z under "decoder", z under "relative"); a flagged clause below it is
      # removed from the corrected caption, as stage B removes it, instead of being rewritten on
      # weak evidence. 0: every flagged clause is rewritten (the paper).
      rewrite_threshold=0.0,
  ))
  # Evaluation (klip_jax/eval/registry.py): the full benchmark (`klip eval`, the end of
  # `klip pretrain`) runs `tasks`; the cheap ones among them also run on the val split every
  # `every` train steps (0: never), logged to TensorBoard and metrics.jsonl.
  c.eval = ml_collections.ConfigDict(dict(
      tasks="all",  # or a comma-separated subset of klip_jax.eval.registry.TASKS
      every=1000,
      at_steps=(),  # further steps to evaluate at, e.g. log-spaced (klip sweep); any of every's too
      periodic_examples=256,  # first N val chips the in-training evaluation reads (0: all)
      batch_size=64,
      test_examples=0,  # first N test chips (0: all)
      train_examples=1024,  # first N train chips: probes, detection head, answer vocabularies
      rerank_k=16,  # ITC candidates the ITM head re-ranks per query
      beam_size=3,
      caption_examples=0,  # test chips captioned (0: all)
      caption_steps=1000,  # caption fine-tuning (language modelling) steps before generation
      caption_lr=1e-5,
      vqa_questions=256,  # per question type
      vqa_candidates=32,  # most frequent train answers ranked
      probe_max_patches=50000,  # patch tokens the segmentation probe is fitted on
      detection_steps=500,
      random_baseline=True,  # also evaluate a randomly initialised model of the same config
      seed=0,
  ))
  # shape: the devices of one slice (ICI); dcn_shape: the slices (DCN) along each axis, so an
  # axis has shape[i] * dcn_shape[i] devices. -1 fills one axis of each; (-1, 1, 1) puts all
  # slices on data, the one axis whose traffic (a gradient reduction a step) suits DCN.
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), dcn_shape=(-1, 1, 1),
                                          axes=("data", "fsdp", "tensor"), rules=DEFAULT_RULES))
  return c


def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}: {message}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Fail early, naming the field, on values that would only fail deep inside a run."""
  v, t = c.model.vision, c.model.text
  _require(c.model.dtype in ("float32", "bfloat16"), "model.dtype", "use float32 or bfloat16.")
  _require(v.image_size % v.patch_size == 0, "model.vision.image_size",
           f"{v.image_size} is not a multiple of patch_size {v.patch_size}.")
  _require(v.width % v.heads == 0, "model.vision.heads", f"width {v.width} is not divisible by {v.heads} heads.")
  _require(t.width % t.heads == 0, "model.text.heads", f"width {t.width} is not divisible by {t.heads} heads.")
  for name, tower in (("vision", v), ("text", t)):
    _require(tower.attention in ("auto", "xla", "cudnn"), f"model.{name}.attention",
             f"use 'auto', 'xla' or 'cudnn' (NVIDIA GPUs), got {tower.attention!r}.")
    _require(tower.attention != "cudnn" or c.model.dtype == "bfloat16", f"model.{name}.attention",
             "cuDNN's fused attention runs in bfloat16 only: set model.dtype=bfloat16 or use 'xla'.")
  _require(c.data.max_len <= t.max_len, "data.max_len",
           f"{c.data.max_len} tokens exceed model.text.max_len={t.max_len} position embeddings.")
  lo, hi = c.model.temp_range
  _require(0 < lo <= c.model.temp_init <= hi, "model.temp_init", f"must lie in temp_range {c.model.temp_range}.")
  _require(c.train.batch_size >= 2, "train.batch_size", "ITM hard negatives need at least 2 examples per batch.")
  _require(c.train.steps >= 1, "train.steps", "must be >= 1.")
  _require(c.train.log_every >= 1, "train.log_every",
           f"must be >= 1 (train steps between logged metrics), got {c.train.log_every}.")
  _require(c.train.ckpt_every >= 1, "train.ckpt_every",
           f"must be >= 1 (train steps between checkpoints; the last step is always saved), got {c.train.ckpt_every}.")
  _require(c.train.keep >= 1, "train.keep", f"must be >= 1 (checkpoints kept, the latest first), got {c.train.keep}.")
  _require(c.optim.grad_accum >= 1, "optim.grad_accum", "must be >= 1.")
  _require(0 <= c.loss.mask_prob + c.loss.random_prob <= 1, "loss.mask_prob",
           "mask_prob + random_prob must lie in [0, 1].")
  _require(0 <= c.loss.extra_mask_rate <= 1, "loss.extra_mask_rate", "must lie in [0, 1].")
  _require(0 <= c.loss.itm_random_negatives <= 1, "loss.itm_random_negatives", "must lie in [0, 1].")
  _require(0 <= c.data.clause_dropout < 1, "data.clause_dropout", "must lie in [0, 1).")
  _require(c.scio.rule in ("paper", "relative", "decoder"), "scio.rule",
           f"use 'paper', 'relative' or 'decoder', got {c.scio.rule!r}.")
  _require(c.scio.max_fill >= 1, "scio.max_fill", "must be >= 1.")
  _require(1 <= c.scio.max_flags <= c.scio.max_clauses, "scio.max_flags",
           f"must be between 1 and scio.max_clauses ({c.scio.max_clauses}), got {c.scio.max_flags}.")
  _require(c.scio.max_candidates >= 2, "scio.max_candidates", "must be >= 2.")
  unknown = skipped_fields(c.scio) - set(knowledge.slot_names())
  _require(not unknown, "scio.skip_fields", f"unknown fields {sorted(unknown)}; use scene_type.field names "
           f"from {', '.join(knowledge.slot_names())}.")
  _require(c.scio.keep_margin >= 0, "scio.keep_margin", f"must be >= 0 nats, got {c.scio.keep_margin}.")
  if c.scio.rewrite_threshold:
    _require(c.scio.rule != "paper", "scio.rewrite_threshold",
             "the paper rule's score has no units to set a bar in; use 0 (rewrite every flag) or the "
             "'relative' or 'decoder' rule.")
    _require(c.scio.rewrite_threshold > c.scio.threshold, "scio.rewrite_threshold",
             f"{c.scio.rewrite_threshold} must exceed scio.threshold ({c.scio.threshold}), the bar to be "
             "flagged at all; or 0: rewrite every flag.")
  if c.momentum.enabled:
    _require(0 < c.momentum.decay < 1, "momentum.decay", "must lie in (0, 1).")
    _require(c.momentum.queue_size >= 0 and c.momentum.queue_size % c.train.batch_size == 0,
             "momentum.queue_size", f"{c.momentum.queue_size} must be a multiple of train.batch_size "
             f"({c.train.batch_size}) so whole batches are enqueued.")
  for name in ("batch_size", "rerank_k", "beam_size", "caption_steps", "vqa_questions", "vqa_candidates",
               "detection_steps", "probe_max_patches", "train_examples"):
    _require(c.eval[name] >= 1, f"eval.{name}", f"must be >= 1, got {c.eval[name]}.")
  _require(c.eval.every >= 0, "eval.every", f"must be >= 0 (0: no in-training evaluation), got {c.eval.every}.")
  _require(all(isinstance(s, int) and 1 <= s <= c.train.steps for s in c.eval.at_steps), "eval.at_steps",
           f"{tuple(c.eval.at_steps)}: give train steps between 1 and train.steps ({c.train.steps}).")
  if not c.data.data_dir:  # the world is synthesised: each split needs a chip (a given data_dir has its own sizes)
    for split in ("train", "val", "test"):
      n = c.data.synth[f"num_{split}"]
      _require(n >= 1, f"data.synth.num_{split}", f"must be >= 1 (chips of the synthesised {split} split), got {n}.")
  _require(c.data.train_examples >= 0, "data.train_examples", "must be >= 0 (0: the whole train split).")
  _require(c.data.data_dir or c.data.train_examples <= c.data.synth.num_train, "data.train_examples",
           f"{c.data.train_examples} chips asked, but the synthesised world has data.synth.num_train="
           f"{c.data.synth.num_train}; lower data.train_examples (0: the whole split) or raise "
           "data.synth.num_train.")
  _require("heldout_loss" not in c.eval.tasks or not 0 < c.eval.periodic_examples < c.train.batch_size,
           "eval.periodic_examples", f"{c.eval.periodic_examples} val examples are less than one batch "
           f"(train.batch_size={c.train.batch_size}), which the heldout_loss task needs.")
  _require(c.eval.periodic_examples >= 0, "eval.periodic_examples", "must be >= 0 (0: the whole val split).")
  _require(len(c.mesh.shape) == 3 and list(c.mesh.axes) == ["data", "fsdp", "tensor"],
           "mesh.shape", "give three sizes for the (data, fsdp, tensor) axes; -1 fills one axis.")
  dcn = tuple(c.mesh.dcn_shape)
  _require(len(dcn) == 3 and all(isinstance(n, int) and (n >= 1 or n == -1) for n in dcn)
           and dcn.count(-1) <= 1, "mesh.dcn_shape",
           f"got {dcn}; give three slice counts for the (data, fsdp, tensor) axes, each >= 1 or one "
           "-1 to fill the rest, e.g. (2, 1, 1): data parallelism over 2 TPU slices; (1, 1, 1) on one.")


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of `spec` ("configs/demo.py" or "configs/demo.py:variant", the variant handed to
  its get_config(arg)) with `--config.a.b=value` overrides, parsed by ml_collections'
  config_flags. Every problem (no such file, a file that fails to import, an unknown field or
  a bad value) is one ConfigError line, raised before any work starts."""
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    raise ConfigError(f"no config file {path!r} (from --config={spec}); give a path such as "
                      f"{os.path.join(CONFIG_DIR, 'demo.py')}.")
  argv = ["klip", f"--config={spec}", *overrides]
  config = _parse(lambda values: config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv,
                                                                 lock_config=False), argv, overrides, spec)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config(arg) must return an ml_collections.ConfigDict, "
                      f"got {type(config).__name__}.")
  return config


def _parse(define, argv: list[str], overrides: Sequence[str], source: str) -> ml_collections.ConfigDict:
  """The config that `define(flag_values)` declares as --config, parsed from `argv` (which ends
  with `overrides`, applied by config_flags); every problem one ConfigError naming `source`."""
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    raise ConfigError(f"unrecognised arguments {bad}; config overrides look like --config.train.steps=50")
  # A FlagValues of its own per load, not absl's process-wide FLAGS: config_flags defines one
  # flag per overridden field at parse time, so a second load in the same process (tests, jobs
  # that read several configs) would collide on the global one.
  values = flags.FlagValues()
  try:
    define(values)  # a config dict's overrides are looked up here, a config file's when parsed
    values(argv)
    return values.config
  except KlipError:
    raise
  except (flags.Error, KeyError, TypeError, ValueError, AttributeError, OSError, SyntaxError,
          ImportError, NameError) as e:
    reason = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
    raise ConfigError(f"bad config {source} {' '.join(overrides)}: {type(e).__name__}: {reason}") from None


def variant(arg: str | None, choices: Sequence[str]) -> str:
  """The variant a config file was asked for (`--config=FILE:variant`); the first choice when
  none was given, a ConfigError naming the choices for an unknown one."""
  if arg in (None, ""):
    return choices[0]
  if arg not in choices:
    raise ConfigError(f"unknown config variant {arg!r}; choose one of {', '.join(choices)}.")
  return arg


def skipped_fields(scio: ml_collections.ConfigDict) -> frozenset[str]:
  """The "scene_type.field" names of `config.scio.skip_fields` (comma-separated)."""
  return frozenset(name.strip() for name in scio.skip_fields.split(",") if name.strip())


def flat(settings: dict, prefix: str = "") -> dict:
  """{"a.b.c": value} for every leaf of nested settings (a config's JSON): a difference between
  two configs named down to the setting, as a --config.a.b.c override would name it."""
  out = {}
  for key, value in settings.items():
    if isinstance(value, dict):
      out.update(flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def differing(settings: dict[str, dict]) -> dict[str, dict[str, list[str]]]:
  """{setting: {value: [names]}} of the flat settings that the named settings dicts give different
  values (e.g. the tasks of a benchmark merged from several runs); a setting only some of them
  hold is compared among those. Values are shown as JSON writes them."""
  seen: dict[str, dict[str, list[str]]] = {}
  for name, chosen in settings.items():
    for key, value in chosen.items():
      seen.setdefault(key, {}).setdefault(json.dumps(value), []).append(name)
  return {key: by_value for key, by_value in seen.items() if len(by_value) > 1}


def differences(settings: dict[str, dict]) -> list[str]:
  """`differing` in words, one line a setting: "eval.seed: 0 (itm, vqa_count), 3 (retrieval)"."""
  return [f"{key}: " + ", ".join(f"{value} ({', '.join(names)})" for value, names in by_value.items())
          for key, by_value in differing(settings).items()]


def read_saved(path: str) -> dict:
  """The settings a run saved as config.json, as a dict. A file cut short (a full disk, a copy
  interrupted) or edited into something else is a ConfigError naming the file and the way out,
  instead of json's or a later attribute lookup's traceback."""
  from klip_jax import io  # here: io imports jax, which loading a config file does not need

  if not io.exists(path):
    raise ConfigError(f"no saved config at {path}; run klip train or klip pretrain in that workdir first.")
  try:
    saved = io.read_json(path)
  except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
    saved, reason = None, f"{type(e).__name__}: {e}"
  else:
    reason = f"a JSON {type(saved).__name__}, not an object of config sections"
  if not isinstance(saved, dict):
    raise ConfigError(_unreadable(path, reason))
  return saved


def _unreadable(path: str, reason: str) -> str:
  return (f"{path} is not a readable run config ({reason}). Restore that file from a copy of the run, or "
          "give the config the run was started with: --config FILE plus the same --config.* overrides.")


def load_saved(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config a run saved (WORKDIR/config.json), on top of today's defaults, so sections
  added since the run was started take their default values; then `--config.a.b=value`
  overrides, as `load` applies them to a file's config (e.g. `klip eval --workdir W
  --config.eval.test_examples=100` evaluates the saved run with other evaluation settings)."""
  saved = read_saved(path)
  config = default_config()
  try:
    config.update(saved)
  except (TypeError, ValueError, AttributeError, KeyError) as e:  # e.g. {"train": 5}: a section that is no section
    raise ConfigError(_unreadable(path, f"{type(e).__name__}: {e}")) from None
  if not overrides:
    return config
  argv = ["klip", *overrides]
  return _parse(lambda values: config_flags.DEFINE_config_dict("config", config, flag_values=values, sys_argv=argv,
                                                               lock_config=False), argv, overrides, path)
