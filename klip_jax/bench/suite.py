"""`klip bench A [B ...]`: run the named benchmarks on one config in one process, and render
their results (with the machine and versions they ran on) as JSON and as a markdown table.

Benchmarks: train (`bench.train.throughput`), relabel, caption, pipeline and memory (compiled
per-device memory of the train step over FSDP meshes). `compare_hf` adds transformers' BLIP
(PyTorch) on the same shapes to train, relabel and caption.
"""

from __future__ import annotations

import datetime
import os
import platform
import tempfile
from importlib import metadata

import jax
import ml_collections

from klip_jax.bench import aot, caption, hf_blip, pipeline, relabel
from klip_jax.bench import train as train_bench
from klip_jax.errors import ConfigError

BENCHMARKS = ("train", "relabel", "caption", "pipeline", "memory")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  except OSError:
    return platform.processor()


def machine() -> dict:
  versions = {}
  for package in ("jax", "jaxlib", "flax", "torch", "transformers"):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      pass
  return {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
          "devices": jax.device_count(), "cpu": _cpu_model(), "host": platform.node(), "versions": versions,
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def run(names, config: ml_collections.ConfigDict, *, vocab_size: int, compare_hf: bool = False,
        rounds: int = 5, peak_tflops: float | None = None, workdir: str = "",
        meshes=((1, 1, 1), (1, 2, 1), (1, 4, 1), (1, 8, 1)),
        devices=None, profile_dir: str = "") -> dict:
  """{"machine": ..., name: result} for each benchmark in `names`. The arguments are checked
  before any benchmark starts (compiling base.py's step alone takes a minute)."""
  unknown = set(names) - set(BENCHMARKS)
  if unknown:
    raise ValueError(f"unknown benchmark {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
  if rounds < 1:
    raise ConfigError(f"--rounds {rounds}: give 1 or more timed rounds (the median is reported).")
  if compare_hf and set(names) & {"train", "relabel", "caption"}:
    hf_blip.device()  # refuses hardware PyTorch would not share with jax
  results = {"machine": machine(), "compare_hf": compare_hf}
  for name in (n for n in BENCHMARKS if n in names):  # train before pipeline: its headroom
    if name == "train":
      results[name] = train_bench.throughput(config, vocab_size, rounds=rounds, compare_hf=compare_hf,
                                             peak_tflops=peak_tflops, profile_dir=profile_dir)
    elif name == "relabel":
      results[name] = relabel.throughput(config, vocab_size, rounds=rounds, compare_hf=compare_hf)
    elif name == "caption":
      results[name] = caption.throughput(config, vocab_size, rounds=rounds, compare_hf=compare_hf)
    elif name == "pipeline":
      with tempfile.TemporaryDirectory() as scratch:
        results[name] = pipeline.throughput(config, workdir or scratch)
      if "train" in results:
        results[name]["train_step_images_per_s"] = results["train"]["klip_jax"]["images_per_s"]
        results[name]["headroom"] = results[name]["images_per_s"] / results[name]["train_step_images_per_s"]
    else:
      results[name] = [aot.compiled_memory(config, vocab_size, mesh, devices) for mesh in meshes]
  return results


def _fmt(x, spec: str = ".3g") -> str:
  return "n/a" if x is None else format(x, spec)


def markdown(results: dict) -> str:
  """One table: each measurement with klip_jax's number, HF's where compared, and the ratio."""
  m = results["machine"]
  lines = [f"{m['date']}, {m['device']} x{m['devices']} ({m['cpu']}), "
           + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
           + (f", XLA_FLAGS={m['xla_flags']}" if m.get("xla_flags") else ""), "",
           "| benchmark | unit | klip_jax | HF transformers | ratio |", "|---|---|---|---|---|"]

  def row(name, unit, ours, theirs=None, ratio=None):
    lines.append(f"| {name} | {unit} | {_fmt(ours)} | {_fmt(theirs)} | {_fmt(ratio, '.2f')}x |"
                 if theirs is not None else f"| {name} | {unit} | {_fmt(ours)} | | |")

  if "train" in results:
    t = results["train"]
    hf = t.get("hf", {})
    row("train step", "images/s", t["klip_jax"]["images_per_s"], hf.get("images_per_s"), t.get("ratio"))
    if "kernel_baseline" in t:
      k = t["kernel_baseline"]
      row("vision fwd+bwd alone (kernels)", "ms", 1e3 * k["klip_jax_vision_fwd_bwd_s"],
          1e3 * k["hf_vision_fwd_bwd_s"], k["ratio"])
    row("train step FLOPs (XLA cost analysis)", "GFLOP", t["klip_jax"]["flops_per_step"] / 1e9)
    if t["peak_tflops"]:
      row("train step MFU", f"of {t['peak_tflops']:g} TFLOP/s per device", t["klip_jax"]["mfu"])
    else:
      row("train step MFU", t["peak_source"], None)
    row("compilations after the first step", "count", t["klip_jax"]["compilations_steady_state"])
  if "relabel" in results:
    r = results["relabel"]
    row("relabel (screen + proofread)", "captions/s", r["klip_jax"]["captions_per_s"],
        r.get("hf", {}).get("captions_per_s"), r.get("ratio"))
  if "caption" in results:
    c = results["caption"]
    for mode in ("greedy", "beam"):
      row(f"captions, {mode} ({c['config']['max_len']} tokens)", "captions/s", c[mode]["klip_jax_captions_per_s"],
          c[mode].get("hf_captions_per_s"), c[mode].get("ratio"))
    if "image_encoding" in c:
      e = c["image_encoding"]
      row("captions: image encoding alone", "ms", 1e3 * e["klip_jax_s"], 1e3 * e["hf_s"], e["ratio"])
      row("captions: greedy minus image encoding (the decoding)", "ms", 1e3 * e["klip_jax_greedy_decoding_s"],
          1e3 * e["hf_greedy_decoding_s"], e["greedy_decoding_ratio"])
      row("captions: greedy bound (HF greedy / our image encoding)", "ms", 1e3 * e["klip_jax_s"],
          1e3 * e["hf_s"] / e["hf_share_of_greedy"], e["greedy_ratio_bound"])
  if "pipeline" in results:
    p = results["pipeline"]
    row("input pipeline", "images/s per core", p["images_per_s_per_core"])
    if "headroom" in p:
      row("input pipeline / train step consumption", "x", p["headroom"])
  if "memory" in results:
    for entry in results["memory"]:
      mesh = ",".join(str(v) for v in entry["mesh"].values())
      row(f"train step memory, mesh (data,fsdp,tensor)=({mesh})", "GiB/device",
          entry.get("total_gib") if entry["fits"] else None)
  if "profile" in results.get("train", {}):
    lines += ["", f"Train step: the ops that took the most time (trace: {results['train']['profile']['trace']})", "",
              "| op | ms per step | share |", "|---|---|---|"]
    lines += [f"| `{o['op'][:80]}` | {o['ms_per_step']:.2f} | {o['share']:.1%} |"
              for o in results["train"]["profile"]["top_ops"]]
  return "\n".join(lines) + "\n"
