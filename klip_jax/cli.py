"""`klip`: one subcommand per user job.

Errors a user can fix (`KlipError`) are printed without a traceback and exit with status 2.
Heavy imports happen inside the subcommands so `klip --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from klip_jax import xla_flags
from klip_jax.errors import KlipError, Preempted


def _data_synth(args, config) -> None:
  from klip_jax.data import builder, prepare

  settings = prepare.synth_settings(config.data.synth)
  path = builder.build(args.out, settings, rebuild=args.rebuild)
  meta = builder.metadata(args.out)
  print(f"dataset at {path}: {settings.num_examples}, train dB mean {meta['db_mean']:.2f} "
        f"std {meta['db_std']:.2f}")


def _data_ingest(args) -> None:
  from klip_jax.data import builder, ingest

  source = ingest.ManifestSource(args.manifest, records=args.records, skip_bad=args.skip_bad,
                                 chip_size=args.chip_size)
  path = builder.build(args.out, source, rebuild=args.rebuild)
  meta = builder.metadata(args.out)
  print(f"dataset at {path}: {source.num_examples}, train dB mean {meta.get('db_mean', float('nan')):.2f} "
        f"std {meta.get('db_std', float('nan')):.2f}")
  if source.skipped:
    print(f"skipped {len(source.skipped)} bad manifest lines (--skip-bad):")
    for reason in source.skipped:
      print(f"  {reason}")


def _data_tile(args) -> None:
  from klip_jax.data import tile

  for scene in args.scene:
    done = tile.tile(scene, args.chip, args.stride or args.chip, args.out, max_nodata=args.max_nodata,
                     value=args.value, band=args.band, split=args.split)
    print(f"{scene}: {done.chips} chips of {args.chip} px ({done.value}), {done.skipped_nodata} windows over "
          f"{args.max_nodata:.0%} nodata skipped; manifest stub {done.manifest} (add scene_type, caption, "
          "keywords)")


def _data_tokenizer(args) -> None:
  from klip_jax.data import lengths, prepare

  codec = prepare.train_tokenizer(args.data, args.vocab_size, args.out)
  print(f"tokenizer at {args.out}: {codec.vocab_size} pieces (at most {args.vocab_size} asked)")
  print(lengths.of_split(args.data, codec, args.max_len).text())


def _data_hcot_prompts(args) -> None:
  from klip_jax.data import hcot

  out = hcot.write_prompts(args.manifest, args.out, args.records)
  print(f"{out['prompts']} HCoT prompts (5 levels each) in {args.out}; {out['with_text']} chips already have "
        "text. Run them through an LLM, then: klip data hcot-parse ANSWERS.jsonl --out RECORDS.jsonl")


def _data_hcot_parse(args) -> None:
  from klip_jax.data import hcot

  accepted, rejected, dropped = hcot.parse_answers(args.answers)
  for rejection in rejected[:args.show]:
    print(rejection)
  if len(rejected) > args.show:
    print(f"... and {len(rejected) - args.show} more rejections")
  hcot.write_records(accepted, rejected, args.answers, args.out)
  print(f"{len(accepted)} of {len(accepted) + len(rejected)} answers -> field records in {args.out}"
        + (f"; rejected {len(rejected)}: {hcot.summary(rejected)}" if rejected else "")
        + (f"; {dropped} keywords not found in their values dropped (the head-phrase rule picks them)"
           if dropped else ""))


def _data_show(args) -> None:
  from klip_jax.data import show

  indices = list(range(args.start, args.start + args.num))
  show.contact_sheet(args.data, args.split, indices, args.out)
  print(f"wrote {args.out}")


def _shows_progress() -> bool:
  """Progress bars on process 0 only (every process of a multi-process run does the same work)."""
  from klip_jax.parallel import hosts

  return hosts.is_writer()


def _pretrain(args, config) -> None:
  from klip_jax.eval import report
  from klip_jax.jobs import pretrain

  results = pretrain.pretrain(config, args.workdir, stop_at=args.stop_at, progress=_shows_progress())
  if results is None:
    print(f"stopped at step {args.stop_at}; run the same command again to continue")
  else:
    print(report.table(results, {}))
    print(f"results, report and plots in {os.path.join(args.workdir, 'eval')}")


def _train(args, config) -> None:
  from klip_jax.jobs import train

  print(json.dumps(train.train(config, args.workdir, stop_at=args.stop_at, progress=_shows_progress())))


def _relabel(args, config) -> None:
  from klip_jax.jobs import relabel

  out = relabel.relabel(config, args.workdir, args.split, progress=_shows_progress())
  print(f"round {out['round']} ({out['captions']} captions, step {out['step']}) -> {out['path']}")
  print(json.dumps(out["metrics"]))


def _eval(args, config) -> None:
  from klip_jax.eval import report, suite

  if args.tasks:
    config.eval.tasks = args.tasks
  results = suite.run(config, args.workdir, step=args.step, progress=_shows_progress())
  print(report.table(results, {}))
  print(f"results, report and plots in {suite.results_folder(args.workdir, results['step'])}")


def _ablate(args, config) -> None:
  from klip_jax import io
  from klip_jax.jobs import ablate

  arms = [a for a in args.arms.split(",") if a] if args.arms else None
  ablate.ablate(config, args.workdir, seeds=args.seeds, arms=arms)
  print(io.read_text(io.path(args.workdir) / "ablation.md"))
  print(f"table, JSON and plot in {args.workdir}: ablation.md, ablation.json, ablation.png")


def _sweep_run(args, config) -> None:
  from klip_jax.jobs import sweep

  only = [p for p in args.points.split(",") if p] or None
  if args.emit_launch:
    if not args.zone:
      from klip_jax.errors import ConfigError
      raise ConfigError("--emit-launch needs --zone ZONE, the TPU slices' zone (e.g. us-west4-a).")
    for command in sweep.launch_commands(config, args.workdir, tpu_name=args.tpu_name, zone=args.zone,
                                         launch_args=args.launch_args, only=only):
      print(command)
    return
  sweep.run(config, args.workdir, only=only, progress=_shows_progress())


def _sweep_fit(args) -> None:
  from klip_jax.sweep import table

  _, text = table.run(args.workdir, loss=args.loss, data=args.data, bootstrap=args.bootstrap, seed=args.seed,
                      floor=args.floor)
  print(text)
  print(f"fit.json, fit.md and plots/ in {args.workdir}")


def _finetune_caption(args, config) -> None:
  from klip_jax.jobs import finetune

  out = finetune.caption(config, args.workdir, steps=args.steps, lr=args.lr, rebuild=args.rebuild)
  folder = os.path.join(args.workdir, "caption_finetune")
  m = out["metrics"]
  if out["skipped"]:
    print(f"{folder} already holds the caption fine-tune of step {out['source_step']} ({out['steps']} steps, "
          f"lr {out['lr']:g}); kept (--rebuild to redo)")
  else:
    print(f"caption fine-tune of step {out['source_step']} ({out['steps']} steps, lr {out['lr']:g}) -> {folder}")
  print(f"test split ({m['num_images']} chips): greedy BLEU-4 {m['greedy_bleu4']:.3f} CIDEr {m['greedy_cider']:.3f}, "
        f"beam BLEU-4 {m['beam_bleu4']:.3f} CIDEr {m['beam_cider']:.3f} (image-blind chance BLEU-4 "
        f"{m['chance_bleu4']:.3f} CIDEr {m['chance_cider']:.3f})")


def _export(args, config) -> None:
  from klip_jax.export import commands

  result = commands.export_workdir(args.workdir, args.out, step=args.step, config=config, captioner=args.captioner)
  print(f"step {result['step']}: {result['retrieval']['path']} (BlipForImageTextRetrieval), "
        f"{result['captioning']['path']} (BlipForConditionalGeneration)")
  print(f"captioning: {result['captioner']['note']}")


def _import_hf(args, config) -> None:
  from klip_jax.export import commands

  result = commands.import_hf(args.hf_dir, config, args.workdir)
  print(f"{result['imported']} tensors imported into {result['init_params']}; "
        f"klip train --workdir {args.workdir} starts from them")
  for name, reason in result["not_imported"].items():
    print(f"  kept klip_jax's own init for {name}: {reason}")
  for note in result["adapted"]:
    print(f"  adapted: {note}")


def _captions_diff(args) -> None:
  from klip_jax import io
  from klip_jax.eval import report, truth
  from klip_jax.train import scio

  path = scio.overlay_path(args.workdir, args.round)
  if not io.exists(path):
    from klip_jax.errors import DatasetError
    raise DatasetError(f"no caption round {args.round} in {args.workdir} (rounds: {scio.rounds(args.workdir)}).")
  entries = io.read_jsonl(path)
  recorded = truth.corruption_recorded(args.workdir)
  if recorded is None:  # the run's data is gone: the overlay's own truth is all there is
    recorded = any(e["truth"] for e in entries)
  print("\n".join(report.captions_diff(entries, recorded, args.limit)))


def _bench(args, config) -> None:
  if args.compare_hf:  # PyTorch shares the GPU with jax there: jax takes memory as it needs it
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  from klip_jax import io
  from klip_jax.bench import aot, suite
  from klip_jax.errors import ConfigError

  if args.json:
    io.check_writable(args.json)  # before minutes of timing, not after
  names = list(dict.fromkeys(args.benchmarks))
  devices = None
  if args.topology and names != ["memory"]:
    # Compiling for a slice's described devices puts jax on this host's CPU: on a TPU VM the
    # timed benchmarks beside it would run on the CPU, not the chips.
    raise ConfigError("--topology compiles `klip bench memory` for a TPU slice on this host's CPU; run it on its "
                      "own (klip bench memory --topology ...) and the other benchmarks without --topology.")
  if "memory" in names:
    if args.topology:
      from klip_jax.bench import train as bench_train

      devices = bench_train.tpu_devices(args.topology)
    elif len(names) > 1 and args.host_devices:
      raise ConfigError("--host-devices makes every benchmark run on virtual CPU devices; run "
                        "`klip bench memory` on its own, or the others without --host-devices.")
  meshes = aot.memory_meshes(args.mesh, len(devices) if devices else None) if "memory" in names else []
  results = suite.run(names, config, vocab_size=args.vocab_size, compare_hf=args.compare_hf, rounds=args.rounds,
                      peak_tflops=args.peak_tflops, workdir=args.workdir, meshes=meshes, devices=devices,
                      profile_dir=args.profile)
  print(suite.markdown(results))
  if args.json:
    io.write_json(args.json, results)
    print(f"results in {args.json}")


def _compile(args, config) -> None:
  from klip_jax import io
  from klip_jax.bench import aot
  from klip_jax.errors import ConfigError

  if args.json:
    io.check_writable(args.json)  # before hours of compiling, not after
  if args.global_batch:
    config.train.batch_size = args.global_batch
  reports, problem = aot.compile_all(config, args.config, args.topology, args.mesh, search_tries=args.search,
                                     steps=args.steps, progress=True)
  print(aot.markdown(reports))
  if args.json:
    io.write_json(args.json, [r.to_json() for r in reports])
    print(f"results in {args.json}")
  if problem:
    raise ConfigError(problem)


def _config(args, overrides: list[str]):
  """The command's config, loaded (and every problem in it reported) before any work starts:
  --config FILE[:variant] with overrides, else the workdir's saved config.json."""
  from klip_jax import config as config_lib

  if args.config:
    return config_lib.load(args.config, overrides)
  return config_lib.load_saved(os.path.join(args.workdir, "config.json"), overrides)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="klip", description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)

  data = commands.add_parser("data", help="build, tokenise and look at datasets").add_subparsers(
      dest="data_command", required=True)
  synth = data.add_parser("synth", help="write the embedded synthetic SAR world as ArrayRecord "
                                         "(sizes, noise, image size: config.data.synth)")
  synth.add_argument("--out", required=True, help="dataset folder")
  synth.add_argument("--rebuild", action="store_true", help="replace a dataset already there")
  _config_arg(synth, "demo.py", "its data.synth section; e.g. --config.data.synth.num_train=2000")
  synth.set_defaults(run=_data_synth)

  ing = data.add_parser("ingest", help="write real chips listed in a JSONL manifest as ArrayRecord")
  ing.add_argument("--manifest", required=True, help="JSONL, one chip per line (klip_jax/data/ingest.py)")
  ing.add_argument("--out", required=True, help="dataset folder")
  ing.add_argument("--records", default="", help="FUSAR-GEOVL-style field records (JSONL) joined to the "
                   "manifest's chips by image_id, for chips without a caption (klip_jax/data/fields.py)")
  ing.add_argument("--skip-bad", action="store_true",
                   help="leave out bad lines (printed with the reason) instead of stopping at the first")
  ing.add_argument("--chip-size", type=int, default=0,
                   help="the chips' side in pixels (default: the first chip's); other sizes are refused")
  ing.add_argument("--rebuild", action="store_true",
                   help="replace a dataset already there (e.g. after images changed on disk)")
  ing.set_defaults(run=_data_ingest)

  til = data.add_parser("tile", help="cut whole SAR scenes into chip GeoTIFFs with a manifest stub")
  til.add_argument("--scene", nargs="+", required=True, help="GeoTIFF (or any GDAL raster) scenes")
  til.add_argument("--chip", type=int, required=True, help="chip side in pixels (the model's image size)")
  til.add_argument("--stride", type=int, default=0, help="pixels between chips (default: --chip, no overlap)")
  til.add_argument("--out", required=True, help="folder: OUT/<scene>/*.tif and the stub OUT/<scene>.jsonl")
  til.add_argument("--max-nodata", type=float, default=0.5,
                   help="skip chips with a larger share of nodata/NaN pixels (default 0.5)")
  til.add_argument("--value", choices=("amplitude", "intensity", "db", "complex"), default=None,
                   help="the scene's value type (default: detected, klip_jax/data/raster.py)")
  til.add_argument("--band", type=_band, default=None,
                   help="band N of a multi-band scene, or I,Q for complex samples in two bands")
  til.add_argument("--split", default="train", help="split written into the stub")
  til.set_defaults(run=_data_tile)

  tok = data.add_parser("tokenizer", help="train a sentencepiece model on a dataset's captions, and report "
                                          "caption token lengths against --max-len")
  tok.add_argument("--data", required=True)
  tok.add_argument("--vocab-size", type=int, default=2000, help="upper bound")
  tok.add_argument("--out", required=True, help="the .model file to write")
  tok.add_argument("--max-len", type=int, default=180,
                   help="the run's config.data.max_len, for the truncation report (default 180; tiny/small: 128)")
  tok.set_defaults(run=_data_tokenizer)

  prompts = data.add_parser("hcot-prompts", help="the paper's hierarchical (HCoT) LLM prompts for chips without "
                                                 "text, one JSON line each (klip_jax/data/hcot.py); calls no LLM")
  prompts.add_argument("--manifest", required=True, help="the ingest manifest (JSONL)")
  prompts.add_argument("--out", required=True, help="prompts JSONL to write")
  prompts.add_argument("--records", default="", help="field records JSONL: chips with a record get no prompt "
                       "(re-ask only for the answers hcot-parse rejected)")
  prompts.set_defaults(run=_data_hcot_prompts)

  parse = data.add_parser("hcot-parse", help="an LLM's answers to the HCoT prompts -> field records for "
                                             "klip data ingest --records; malformed answers rejected with reasons")
  parse.add_argument("answers", help='JSONL, one {"image_id", "answer": "<reply>"} per line')
  parse.add_argument("--out", required=True, help="field records JSONL to write")
  parse.add_argument("--show", type=int, default=20, help="rejections listed at most")
  parse.set_defaults(run=_data_hcot_parse)

  show = data.add_parser("show", help="save a PNG of chips with their captions")
  show.add_argument("--data", required=True)
  show.add_argument("--split", default="train")
  show.add_argument("--start", type=int, default=0)
  show.add_argument("--num", type=int, default=6)
  show.add_argument("--out", required=True, help="PNG file")
  show.set_defaults(run=_data_show)

  train = commands.add_parser("train", help="train KLIP (resumes from the workdir's latest checkpoint)")
  _config_arg(train, None, "required")
  train.add_argument("--workdir", required=True)
  _distributed_args(train)
  train.add_argument("--stop-at", type=int, default=None,
                     help="stop (checkpointed) at this step; running again resumes exactly")
  train.set_defaults(run=_train)

  pre = commands.add_parser("pretrain", help="the main job: data, tokenizer, SCIO A->B->C, evaluation")
  _config_arg(pre, "demo.py", "the README's main job")
  pre.add_argument("--workdir", required=True)
  _distributed_args(pre)
  pre.add_argument("--stop-at", type=int, default=None)
  pre.set_defaults(run=_pretrain)

  rel = commands.add_parser("relabel", help="one SCIO round over a split from the latest checkpoint")
  rel.add_argument("--workdir", required=True)
  rel.add_argument("--split", default="train")
  _config_arg(rel, "", "default: the workdir's saved config.json")
  _distributed_args(rel)
  rel.set_defaults(run=_relabel)

  ev = commands.add_parser("eval", help="the downstream benchmark: results.json, report.md, plots")
  ev.add_argument("--workdir", required=True)
  ev.add_argument("--step", type=int, default=None,
                  help="checkpoint step (default: the latest); a step other than the one W/eval/ holds, "
                       "unless it is the latest, goes to W/eval/step_<S>/")
  ev.add_argument("--tasks", default="",
                  help="comma-separated subset (default: config.eval.tasks), merged into the step's results.json: "
                       "each task run replaces only its own entry")
  _config_arg(ev, "", "default: the workdir's saved config.json")
  _distributed_args(ev)
  ev.set_defaults(run=_eval)

  abl = commands.add_parser("ablate", help="ablations over seeds: mean and 95%% CI per metric").add_subparsers(
      dest="ablate_command", required=True)
  abl_scio = abl.add_parser("scio", help="stage A only vs paper SCIO vs SCIO + extensions, equal steps")
  _config_arg(abl_scio, "demo.py", "the config every arm starts from")
  abl_scio.add_argument("--workdir", required=True)
  abl_scio.add_argument("--seeds", type=int, default=3)
  abl_scio.add_argument("--arms", default="",
                        help="comma-separated arms (default stage_a,paper,extended; also stage_a_extended, "
                             "extended-no_<extension> for each extension, extended+clause_negatives)")
  abl_scio.set_defaults(run=_ablate)

  swp = commands.add_parser("sweep", help="scaling-law sweeps: train a grid of model and data sizes, fit "
                                           "L(N, D)").add_subparsers(dest="sweep_command", required=True)
  swp_run = swp.add_parser("run", help="train every point not yet done, sequentially, each recorded in "
                                       "WORKDIR/sweep.jsonl (a rerun skips done points, resumes, retries failed)")
  _config_arg(swp_run, "sweeps/micro.py", "a sweep config: configs/sweeps/*.py")
  swp_run.add_argument("--workdir", required=True, help="sweep folder: WORKDIR/points/<name>/ per point")
  swp_run.add_argument("--points", default="", help="comma-separated point names (default: all)")
  swp_run.add_argument("--emit-launch", action="store_true",
                       help="print one launch/tpu_vm.sh command per point (one TPU slice each) instead of "
                            "training; a later `klip sweep run` on the same WORKDIR records their results")
  swp_run.add_argument("--tpu-name", default="klip-sweep",
                       help="--emit-launch: slice names are TPU_NAME-<point>")
  swp_run.add_argument("--zone", default="", help="--emit-launch: the slices' zone, e.g. us-west4-a")
  swp_run.add_argument("--launch-args", default="",
                       help="--emit-launch: more launch/tpu_vm.sh options, e.g. \"--project P --data-dir /data\"")
  swp_run.set_defaults(run=_sweep_run)
  swp_fit = swp.add_parser("fit", help="fit WORKDIR/sweep.jsonl: fit.json, fit.md, plots/ (klip_jax/sweep/fit.py)")
  swp_fit.add_argument("workdir", help="the sweep's workdir, holding sweep.jsonl")
  swp_fit.add_argument("--loss", choices=("total", "itc", "itm", "reconstruction"), default="total",
                         help="the held-out loss head to fit (default total)")
  swp_fit.add_argument("--data", choices=("images_seen", "unique_images"), default="images_seen",
                         help="D: images seen at each eval (default), or each run's unique train images (final "
                              "evals only; data-constrained questions)")
  swp_fit.add_argument("--bootstrap", type=int, default=200, help="resamples of the runs for the 95%% CIs (0: none)")
  swp_fit.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
  swp_fit.add_argument("--floor", choices=("fit", "zero"), default="fit",
                       help="the irreducible loss E: fitted (default), or fixed at 0 for losses far above it (the fit "
                            "says when E cannot be told from 0)")
  swp_fit.set_defaults(run=_sweep_fit)

  fine = commands.add_parser("finetune", help="fine-tune a trained workdir for a downstream task").add_subparsers(
      dest="finetune_command", required=True)
  fine_caption = fine.add_parser(
      "caption", help="the benchmark's caption fine-tune of the latest checkpoint, saved to "
                      "WORKDIR/caption_finetune (what klip export ships and klip eval scores)")
  fine_caption.add_argument("--workdir", required=True)
  fine_caption.add_argument("--steps", type=int, default=None, help="default: config.eval.caption_steps")
  fine_caption.add_argument("--lr", type=float, default=None, help="default: config.eval.caption_lr")
  fine_caption.add_argument("--rebuild", action="store_true", help="replace a fine-tune already there")
  _config_arg(fine_caption, "", "default: the workdir's saved config.json")
  _distributed_args(fine_caption)
  fine_caption.set_defaults(run=_finetune_caption)

  exp = commands.add_parser("export", help="Hugging Face BLIP (PyTorch) folders: retrieval/ and captioning/")
  exp.add_argument("--workdir", required=True)
  exp.add_argument("--out", required=True, help="folder to write: new, empty, or an earlier export (replaced)")
  exp.add_argument("--captioner", choices=("auto", "finetuned", "pretrain"), default="auto",
                   help="what captioning/ holds: the caption fine-tune (klip finetune caption), the pretraining "
                        "decoder (reconstructs keywords only), or auto: the fine-tune when it was made from the "
                        "exported step, else the pretraining decoder with a warning")
  exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  _config_arg(exp, "", "default: the workdir's saved config.json")
  _distributed_args(exp)
  exp.set_defaults(run=_export)

  imp = commands.add_parser("import-hf", help="start a workdir from a Hugging Face BLIP checkpoint")
  imp.add_argument("hf_dir", help="a save_pretrained folder, or one holding retrieval/ and captioning/")
  _config_arg(imp, None, "one matching the checkpoint's widths, e.g. configs/base.py")
  imp.add_argument("--workdir", required=True)
  _distributed_args(imp)
  imp.set_defaults(run=_import_hf)

  captions = commands.add_parser("captions", help="inspect caption overlays").add_subparsers(
      dest="captions_command", required=True)
  diff = captions.add_parser("diff", help="what a round changed: original / flagged / corrected / true")
  diff.add_argument("--workdir", required=True)
  diff.add_argument("--round", type=int, required=True)
  diff.add_argument("--limit", type=int, default=20)
  diff.set_defaults(run=_captions_diff)

  bench = commands.add_parser(
      "bench", help="measure speed: train, relabel, caption, pipeline, memory (with --compare-hf: vs HF BLIP)")
  bench.add_argument("benchmarks", nargs="+", choices=("train", "relabel", "caption", "pipeline", "memory"),
                     metavar="BENCHMARK", help="one or more of train, relabel, caption, pipeline, memory")
  _config_arg(bench, "tiny.py", "the shapes and model to time")
  bench.add_argument("--compare-hf", action="store_true",
                     help="time transformers' BLIP (PyTorch) on the same shapes in the same run (export extra)")
  bench.add_argument("--json", default="", help="also write the results to this JSON file")
  bench.add_argument("--rounds", type=int, default=5, help="timed rounds; the median is reported")
  bench.add_argument("--vocab-size", type=int, default=2000)
  bench.add_argument("--peak-tflops", type=float, default=None,
                     help="the device's peak for MFU where it is not known (CPUs, unlisted chips)")
  bench.add_argument("--workdir", default="", help="pipeline: where to build the data (default: a temp dir)")
  bench.add_argument("--profile", default="", help="train: write a jax.profiler trace here and list the top ops")
  bench.add_argument("--host-devices", type=int, default=0,
                     help="memory: virtual CPU devices to compile for (default 8 when run alone)")
  bench.add_argument("--topology", default="",
                     help="memory: compile for a TPU topology instead, e.g. v5e:2x4 (needs the [tpu] extra)")
  bench.add_argument("--mesh", nargs="+", default=[], metavar="D,F,T",
                     help="memory: data,fsdp,tensor sizes (-1 fills one), or data / fsdp: every device on that "
                          "axis; one compile each (default: FSDP over 1, 2, 4 and 8 devices, as many as there are)")
  bench.set_defaults(run=_bench)

  comp = commands.add_parser(
      "compile", help="compile train_step and relabel_step for a TPU slice on this CPU: memory per chip against "
                      "HBM, FLOPs, speed at peak; exits 2 when a step does not fit (needs the [tpu] extra)")
  _config_arg(comp, None, "required")
  comp.add_argument("--topology", nargs="+", required=True, metavar="SLICE",
                    help="one or more TPU slices: v5e:16x16, v5e-16, v5p:2x2x2, v5p-8, v4-32, v6e-8, ...")
  comp.add_argument("--mesh", nargs="+", default=[], metavar="D,F,T",
                    help="data,fsdp,tensor sizes, -1 fills one, or data / fsdp: every chip on that axis "
                         "(default config.mesh.shape); one compile each")
  comp.add_argument("--global-batch", type=int, default=0, help="images per step over all chips "
                    "(default config.train.batch_size)")
  comp.add_argument("--steps", nargs="+", choices=("train", "relabel"), default=["train", "relabel"],
                    help="the steps to compile (default both)")
  comp.add_argument("--search", type=int, default=3,
                    help="when a step does not fit, compile up to this many stricter remat policies / "
                         "fuller FSDP meshes to find one that does (0: none)")
  comp.add_argument("--json", default="", help="also write the reports to this JSON file")
  comp.set_defaults(run=_compile)
  return parser


def _band(text: str):
  """--band N or --band I,Q -> N or [I, Q] (the manifest's "band")."""
  try:
    numbers = [int(b) for b in text.split(",")]
  except ValueError:
    numbers = []
  if len(numbers) not in (1, 2):
    raise argparse.ArgumentTypeError(f"{text!r}: give a band number N or a pair I,Q")
  return numbers[0] if len(numbers) == 1 else numbers


def _config_arg(parser: argparse.ArgumentParser, default: str | None, what: str) -> None:
  """--config FILE[:variant] (a shipped config's name or any path) plus --config.a.b=v overrides."""
  from klip_jax.config import CONFIG_DIR

  parser.add_argument("--config", required=default is None,
                      default=os.path.join(CONFIG_DIR, default) if default else "",
                      help=f"a get_config(arg) file, FILE or FILE:variant ({what}); override any "
                           "field with --config.a.b=value")
  parser.set_defaults(takes_config=True)


def _distributed_args(parser: argparse.ArgumentParser) -> None:
  """--distributed: the command is one process of a multi-process run (every process runs it)."""
  group = parser.add_argument_group("multi-process runs (every process runs the same command; see launch/)")
  group.add_argument("--distributed", action="store_true",
                     help="join the run first: jax.distributed.initialize() finds the cluster itself "
                          "(Cloud TPU VMs, GKE, SLURM) unless --coordinator is given")
  group.add_argument("--coordinator", default=None,
                     help="HOST:PORT of process 0, with --num-processes and --process-id (e.g. "
                          "localhost:PORT for several processes on one machine)")
  group.add_argument("--num-processes", type=int, default=None)
  group.add_argument("--process-id", type=int, default=None)


def _join(args) -> None:
  """Start jax.distributed when the command is one process of a multi-process run."""
  from klip_jax.errors import ConfigError
  from klip_jax.parallel import hosts

  manual = (args.coordinator, args.num_processes, args.process_id)
  if any(x is not None for x in manual) and (not args.distributed or None in manual):
    raise ConfigError("--coordinator, --num-processes and --process-id go together, with --distributed "
                      "(or give none of them and let jax find the cluster).")
  hosts.initialize(*manual)


def main(argv: list[str] | None = None) -> int:
  args, overrides = _parser().parse_known_args(argv)
  if overrides and not getattr(args, "takes_config", False):
    _parser().parse_args(argv)  # exits with argparse's message for the unknown arguments
  if getattr(args, "benchmarks", None) == ["memory"] and not args.host_devices and not args.topology:
    args.host_devices = 8
  if getattr(args, "host_devices", None):
    # Virtual CPU devices must be requested before jax initialises its backend.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.host_devices}")
  try:
    if getattr(args, "takes_config", False):
      config = _config(args, overrides)  # every config problem surfaces here, before any work
      if getattr(args, "distributed", False) or getattr(args, "coordinator", None):
        _join(args)
      args.run(args, config)
    else:
      args.run(args)
  except KlipError as e:
    print(f"klip: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # a path that cannot be read or written: the user's to fix (klip_jax.errors)
    print(f"klip: error: {e}; check that path (--workdir, --out, --json, --config.data.*): a folder where one belongs, "
          "writable, with free space.", file=sys.stderr)
    return 2
  except Preempted as e:  # checkpointed at a step boundary: a clean exit, the rerun continues
    print(f"klip: {e}", file=sys.stderr)
    return 0
  return 0


def run() -> int:
  """The `klip` command: main() in a process that starts with klip's XLA flags (xla_flags.py).
  Called from Python, main() leaves XLA_FLAGS as the caller set it."""
  os.environ["XLA_FLAGS"] = xla_flags.with_defaults(os.environ.get("XLA_FLAGS", ""))
  return main()


if __name__ == "__main__":
  sys.exit(run())
