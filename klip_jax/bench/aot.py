"""`klip compile`: the train and relabel steps compiled ahead of time for a TPU slice, on a CPU.

libtpu (the [tpu] extra) describes the devices of a TPU topology with no TPU attached
(`jax.experimental.topologies`). The steps are lowered for abstract, sharded inputs on a mesh
over those devices and compiled by the real TPU compiler: its `memory_analysis()` gives the
bytes each chip holds (arguments, temporaries, outputs); each chip's share of the step's model
FLOPs (`flops.py`: the compiled program's own count sees a scanned stack's loop body once) gives
the time at peak. From those: whether the steps fit the chip's HBM, the step time at the
chip's bf16 peak and the examples/s at a given MFU. When they do not fit, stricter remat
policies and a fully FSDP-sharded mesh are compiled (at most `search` of them) to find one that
does. `klip bench memory` compiles through the same function (`compiled_memory`).

What is compiled: the train step of SCIO stage A (the other stages add at most the caption's
recon_* copies to the batch) and the relabel step with proofreading (stage C's), on the batch
the training loop gives it (the train batch online, config.scio.relabel_batch_size offline).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import jax
import ml_collections
from tqdm import tqdm

from klip_jax import config as config_lib
from klip_jax.bench import flops, inputs
from klip_jax.bench import peak as peak_lib
from klip_jax.errors import ConfigError
from klip_jax.parallel import mesh as mesh_lib
from klip_jax.train import relabel as relabel_lib
from klip_jax.train import step as step_lib

GIB = 2.0**30
# Remat policies (klip_jax/model/layers.py) from the most activation memory to the least.
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")
MFU = 0.4  # the utilisation the examples/s column assumes


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: HBM per chip (GiB; Google's Cloud TPU system-architecture pages), dense
  bf16 peak (peak.py), libtpu's chip config (v4 runs megacore: one jax device per chip, as on a
  real v4 VM), TensorCores per chip (accelerator types such as v4-8 and v5p-8 count cores) and
  the torus's dimensions."""
  generation: str
  hbm_gib: float
  chip_config: str
  cores_per_chip: int
  torus_dims: int
  max_chips: int

  @property
  def peak_tflops(self) -> float:
    return peak_lib.device_peak_tflops(f"tpu {self.generation}")


CHIPS = {c.generation: c for c in (Chip("v4", 32, "megacore", 2, 3, 4096), Chip("v5e", 16, "default", 1, 2, 256),
                                   Chip("v5p", 95, "default", 2, 3, 6144), Chip("v6e", 32, "default", 1, 2, 256))}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}  # accelerator-type spellings of the same chip
EXAMPLES = "v5e:16x16, v5e-16, v5p:2x2x2, v5p-8, v4-32, v6e-8"


@dataclasses.dataclass(frozen=True)
class Topology:
  generation: str
  shape: tuple[int, ...]  # chips along each torus dimension

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def name(self) -> str:
    """libtpu's name of the topology, e.g. "v5e:4x4"."""
    return f"{self.generation}:{'x'.join(map(str, self.shape))}"


def slice_shape(chips: int, torus_dims: int) -> tuple[int, ...]:
  """Google's standard slice shape of `chips` chips (a power of two): 2D tori 1x1, 2x2, 2x4, 4x4,
  4x8, ..., 16x16; 3D tori 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (each step doubles the
  shortest dimension, the last of equals)."""
  if chips == 1 and torus_dims == 2:
    return (1, 1)
  if chips < 4 or chips & (chips - 1):
    raise ValueError(f"no standard slice of {chips} chips")
  shape = [2, 2] + [1] * (torus_dims - 2)
  while math.prod(shape) < chips:
    i = max(j for j, n in enumerate(shape) if n == min(shape))
    shape[i] *= 2
  return tuple(shape)


def parse_topology(text: str) -> Topology:
  """A topology as libtpu names it ("v5e:4x4", "v5p:2x2x2") or as an accelerator type
  ("v5e-16", "v5litepod-16": 16 chips; "v5p-8", "v4-8": 8 TensorCores, 4 chips)."""
  def unknown(why: str) -> ConfigError:
    return ConfigError(f"--topology {text!r}: {why}; give a TPU slice such as {EXAMPLES} "
                       f"(generations: {', '.join(CHIPS)}).")

  explicit = re.fullmatch(r"([a-z0-9]+)[:=](\d+(?:x\d+)*)", text.strip().lower())
  accelerator = re.fullmatch(r"([a-z0-9]+)-(\d+)", text.strip().lower())
  if not (explicit or accelerator):
    raise unknown("not a topology name")
  generation = (explicit or accelerator).group(1)
  generation = ALIASES.get(generation, generation)
  if generation not in CHIPS:
    raise unknown(f"unknown TPU generation {generation!r}")
  chip = CHIPS[generation]
  if explicit:
    shape = tuple(int(n) for n in explicit.group(2).split("x"))
    if len(shape) != chip.torus_dims or min(shape) < 1:
      raise unknown(f"a {generation} slice is a {chip.torus_dims}D torus of positive sizes")
  else:
    count = int(accelerator.group(2))
    if count % chip.cores_per_chip:
      raise unknown(f"{generation}-N counts TensorCores, {chip.cores_per_chip} per chip")
    try:
      shape = slice_shape(count // chip.cores_per_chip, chip.torus_dims)
    except ValueError as e:
      raise unknown(f"{e}; name its shape instead, e.g. {generation}:{'x'.join(['2'] * chip.torus_dims)}") from None
  topology = Topology(generation, shape)
  if topology.chips > chip.max_chips:
    raise unknown(f"a {generation} slice has at most {chip.max_chips} chips")
  return topology


# Named layouts for --mesh ("-1,1,1" would read as an option on a command line).
LAYOUTS = {"data": (-1, 1, 1), "fsdp": (1, -1, 1)}


def parse_mesh(text: str) -> tuple[int, int, int]:
  """"data,fsdp,tensor" sizes, e.g. "16,1,1" or "1,-1,1" (-1: the rest of the chips), or a named
  layout: "data" (data parallel over every chip), "fsdp" (FSDP over every chip)."""
  if text in LAYOUTS:
    return LAYOUTS[text]
  try:
    shape = tuple(int(n) for n in text.split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or any(n == 0 or n < -1 for n in shape):
    raise ConfigError(f"--mesh {text!r}: give data,fsdp,tensor sizes such as 16,1,1 or 1,-1,1 (-1 fills one "
                      f"axis), or {' or '.join(LAYOUTS)} (all chips on that axis).")
  return shape


def memory_meshes(given: list[str], device_count: int | None = None) -> list[tuple[int, int, int]]:
  """`klip bench memory`'s meshes: `given` (--mesh; each checked against the devices there are),
  else FSDP over 1, 2, 4 and 8 devices, as many as there are."""
  count = device_count or jax.device_count()
  if not given:
    return [(1, n, 1) for n in (1, 2, 4, 8) if n <= count]
  meshes = [parse_mesh(m) for m in given]
  for text, shape in zip(given, meshes):
    if all(n > 0 for n in shape) and math.prod(shape) > count:
      raise ConfigError(f"--mesh {text} needs {math.prod(shape)} devices and there are {count}; give "
                        f"--host-devices {math.prod(shape)} (virtual CPU devices) or a smaller mesh.")
  return meshes


def tpu_devices(topology: str | Topology) -> list:
  """The devices of one TPU slice, described by libtpu for ahead-of-time compilation on this
  host (needs the [tpu] extra). Nothing runs on them, so jax itself stays on the CPU."""
  topology = parse_topology(topology) if isinstance(topology, str) else topology
  jax.config.update("jax_platforms", "cpu")  # libtpu present: do not look for TPU chips here
  # libtpu's one-process lock guards real chips; compile-only use must not block (or be blocked
  # by) another process that compiles, such as a second `klip compile` or the test suite.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  shape3 = topology.shape + (1,) * (3 - len(topology.shape))
  per_host = tuple(min(n, bound) for n, bound in zip(shape3, (2, 2, 1)))  # a TPU VM's 2x2 chips
  try:
    return list(topologies.get_topology_desc(
        platform="tpu", topology_name=topology.name, chip_config_name=topology.chip.chip_config,
        chips_per_host_bounds=per_host, num_slices=1).devices)
  except Exception as e:  # libtpu missing, unusable here, or a shape it does not know
    reason = " ".join(str(e).split())[:300]
    raise ConfigError(f"libtpu cannot describe TPU topology {topology.name} ({type(e).__name__}: {reason}); "
                      "install the [tpu] extra (pip install -e \".[tpu]\") and give a slice such as "
                      f"{EXAMPLES}.") from None


@dataclasses.dataclass
class StepReport:
  """One step compiled for one mesh: bytes per chip, FLOPs per chip per step, and the batch.
  `error` holds the compiler's refusal (it does not fit); the byte fields are then None."""
  step: str
  batch: int
  argument: int | None = None
  output: int | None = None
  temp: int | None = None
  alias: int | None = None
  flops: float | None = None  # the step's model FLOPs over the chips (flops.py; no recomputation)
  compile_s: float = 0.0
  resident: int = 0  # bytes held beside the program while it runs in training (relabel: the state)
  error: str = ""

  @property
  def total(self) -> int | None:
    """Peak bytes per chip: arguments, outputs and temporaries (less donated buffers reused as
    outputs), plus what stays resident beside the program."""
    if self.argument is None:
      return None
    return self.argument + self.output + self.temp - self.alias + self.resident


def fits(total_bytes: int | None, hbm_gib: float) -> bool:
  """The compiler accepted the program (total known) and its bytes fit the chip's HBM."""
  return total_bytes is not None and total_bytes <= hbm_gib * GIB


def step_seconds_at_peak(flops_per_chip: float, peak_tflops: float) -> float:
  return flops_per_chip / (peak_tflops * 1e12)


def examples_per_s(batch: int, flops_per_chip: float, peak_tflops: float, mfu: float = MFU) -> float:
  """Global examples per second when every chip runs its share of the step at `mfu` of peak."""
  return batch / (step_seconds_at_peak(flops_per_chip, peak_tflops) / mfu)


def chip_bytes(tree) -> int:
  """Bytes one chip holds of a pytree of sharded ShapeDtypeStructs (the largest shard; shards
  of a NamedSharding all have one shape)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _remat(config) -> str:
  v, t = config.model.vision.remat, config.model.text.remat
  return v if v == t else f"vision {v}, text {t}"


def relabel_batch(config) -> int:
  """The batch the training loop relabels: the train batch online, relabel_batch_size offline."""
  return config.train.batch_size if config.scio.mode == "online" else config.scio.relabel_batch_size


def _compile(step: str, batch: int, jitted, *args) -> StepReport:
  report = StepReport(step, batch)
  start = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The compiler's own verdict that the step does not fit is a result, not a crash.
    report.error = " ".join(str(e).split())[:400]
    report.compile_s = time.perf_counter() - start
    return report
  report.compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  report.argument, report.output = memory.argument_size_in_bytes, memory.output_size_in_bytes
  report.temp, report.alias = memory.temp_size_in_bytes, memory.alias_size_in_bytes
  return report


def compile_steps(config: ml_collections.ConfigDict, vocab_size: int, mesh: jax.sharding.Mesh,
                  steps=("train", "relabel")) -> list[StepReport]:
  """The train step (and the relabel step) lowered for abstract inputs sharded on `mesh` and
  compiled; nothing is allocated, so any mesh of real or described devices works."""
  graph, tx, schedule, shardings, state = inputs.abstract_state(config, vocab_size, mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  rng = inputs.abstract_rng(mesh)
  tokens = inputs.token_ids(vocab_size)
  reports = []
  with mesh_lib.logical_context(mesh, config.mesh.rules):
    if "train" in steps:
      b = config.train.batch_size
      train = step_lib.make_train_step(config, graph, tx, schedule, tokens, shardings, mesh)
      reports.append(_compile("train_step", b, train, state, inputs.abstract_batch(config, batch_sharding), rng))
    if "relabel" in steps:
      b = relabel_batch(config)
      relabel = relabel_lib.make_relabel_step(config, graph, tokens, shardings.params, mesh)
      report = _compile("relabel_step", b, relabel, state.params,
                        inputs.abstract_batch(config, batch_sharding, b), rng)
      report.resident = chip_bytes(state) - chip_bytes(state.params)  # optimizer, momentum, queues
      reports.append(report)
  # Counted on the host's CPU, outside the slice's mesh (flops.py).
  for report in reports:
    count = flops.train_step(config, vocab_size) if report.step == "train_step" else flops.relabel_step(
        config, vocab_size, report.batch)
    report.flops = count / mesh.size
  return reports


def compiled_memory(config: ml_collections.ConfigDict, vocab_size: int, mesh_shape, devices=None) -> dict:
  """`klip bench memory`: the train step's bytes per device on a (data, fsdp, tensor) mesh over
  the first devices (FSDP over 2 of 8 devices: a 2-device mesh)."""
  devices = list(jax.devices() if devices is None else devices)
  if all(n > 0 for n in mesh_shape):
    devices = devices[:math.prod(mesh_shape)]
  mesh = mesh_lib.make_mesh(mesh_shape, devices)
  (report,) = compile_steps(config, vocab_size, mesh, steps=("train",))
  result = {"mesh": dict(zip(mesh_lib.AXES, mesh.devices.shape)), "fits": not report.error}
  if report.error:
    return {**result, "error": report.error}
  return {**result, "argument_gib": report.argument / GIB, "output_gib": report.output / GIB,
          "temp_gib": report.temp / GIB, "alias_gib": report.alias / GIB, "total_gib": report.total / GIB,
          "flops_per_device": report.flops, "compile_s": report.compile_s}


def _with_remat(config: ml_collections.ConfigDict, remat: str) -> ml_collections.ConfigDict:
  """A copy of `config` with `remat` in both towers (a mixed "vision a, text b": unchanged)."""
  config = config.copy_and_resolve_references()
  if remat in REMAT_ORDER:
    config.model.vision.remat = config.model.text.remat = remat
  return config


def _check_batch(config, mesh_shape) -> None:
  mesh_lib.check_batch(config.train.batch_size, mesh_shape, "--global-batch (config.train.batch_size)", "chips")
  mesh_lib.check_batch(relabel_batch(config), mesh_shape, "config.scio.relabel_batch_size", "chips")


@dataclasses.dataclass
class Report:
  """Both steps of one config compiled for one topology and mesh."""
  config: str
  topology: Topology
  device_kind: str
  mesh: tuple[int, int, int]
  remat: str
  steps: list[StepReport]

  @property
  def fits(self) -> bool:
    return all(fits(s.total, self.topology.chip.hbm_gib) for s in self.steps)

  def to_json(self) -> dict:
    chip = self.topology.chip
    steps = []
    for s in self.steps:
      entry = {"step": s.step, "batch": s.batch, "compile_s": s.compile_s,
               "fits": fits(s.total, chip.hbm_gib), "error": s.error}
      if s.total is not None:
        entry.update({f"{k}_gib": getattr(s, k) / GIB for k in ("argument", "temp", "output", "alias",
                                                                 "resident", "total")})
      if s.flops:
        entry.update(flops_per_chip=s.flops, step_s_at_peak=step_seconds_at_peak(s.flops, chip.peak_tflops),
                     examples_per_s_at_mfu=examples_per_s(s.batch, s.flops, chip.peak_tflops))
      steps.append(entry)
    return {"config": self.config, "topology": self.topology.name, "chips": self.topology.chips,
            "device_kind": self.device_kind, "hbm_gib": chip.hbm_gib, "peak_tflops": chip.peak_tflops,
            "mfu": MFU, "mesh": dict(zip(mesh_lib.AXES, self.mesh)), "remat": self.remat, "fits": self.fits,
            "steps": steps}


def compile_report(config: ml_collections.ConfigDict, topology: Topology, mesh_shape=None, *,
                   name: str = "", devices=None, steps=("train", "relabel")) -> Report:
  """`steps` of `config` compiled for `topology` on `mesh_shape` (default config.mesh.shape;
  -1 fills one axis) over its chips."""
  config_lib.validate(config)
  devices = tpu_devices(topology) if devices is None else devices
  shape = mesh_lib.resolve_shape(tuple(mesh_shape or config.mesh.shape), len(devices))
  _check_batch(config, shape)
  mesh = mesh_lib.make_mesh(shape, devices)
  return Report(name, topology, devices[0].device_kind, shape, _remat(config),
                compile_steps(config, config.data.vocab_size, mesh, steps))


def alternatives(config: ml_collections.ConfigDict, mesh_shape) -> list[tuple[tuple[int, int, int], str]]:
  """(mesh, remat policy) to try when `config` does not fit on `mesh_shape`, cheapest in speed
  first: stricter remat on this mesh, then full FSDP (parameters and optimizer state sharded
  over all data-parallel chips) with this remat and the stricter ones."""
  d, f, t = mesh_shape
  current = max(REMAT_ORDER.index(config.model.vision.remat), REMAT_ORDER.index(config.model.text.remat))
  stricter = list(REMAT_ORDER[current + 1:])
  out = [(tuple(mesh_shape), r) for r in stricter]
  if d > 1:
    out += [((1, d * f, t), r) for r in [_remat(config), *stricter]]
  return out


def search(config: ml_collections.ConfigDict, report: Report, tries: int, devices) -> tuple[Report | None, list]:
  """Compile up to `tries` of `alternatives` until one fits -> (that one or None, [(mesh, remat,
  outcome)]). When the train state takes over half the HBM, the other mesh comes first (no remat
  policy shrinks the state). Skipped without compiling: an alternative whose train state alone
  exceeds the HBM, and a remat change when only the relabel step (which computes no gradients)
  does not fit; a remat change on the same mesh recompiles the train step only."""
  hbm = report.topology.chip.hbm_gib
  failing = {s.step for s in report.steps if not fits(s.total, hbm)}

  def state_bytes(c, shape) -> int:  # the train state's bytes per chip, from shapes alone
    return chip_bytes(inputs.abstract_state(c, c.data.vocab_size, mesh_lib.make_mesh(shape, devices))[-1])

  options = alternatives(config, report.mesh)
  if state_bytes(config, report.mesh) > hbm * GIB / 2:
    options.sort(key=lambda option: option[0] == tuple(report.mesh))  # stable: the order within each mesh stays
  tried = []
  for mesh_shape, remat in options:
    if sum(outcome != "skipped" for *_, outcome in tried) >= tries:
      break
    same_mesh = tuple(mesh_shape) == tuple(report.mesh)
    if same_mesh and "train_step" not in failing:
      continue
    candidate = _with_remat(config, remat)
    if state_bytes(candidate, mesh_shape) > hbm * GIB:
      tried.append((mesh_shape, remat, "skipped"))
      continue
    kinds = tuple(s.step.removesuffix("_step") for s in report.steps)  # "train", "relabel"
    result = compile_report(candidate, report.topology, mesh_shape, name=report.config, devices=devices,
                            steps=("train",) if same_mesh else kinds)
    if same_mesh:
      result.steps += [s for s in report.steps if s.step != "train_step"]
    tried.append((mesh_shape, remat, "fits" if result.fits else "does not fit"))
    if result.fits:
      return result, tried
  return None, tried


def _gib(x) -> str:
  return "-" if x is None else f"{x / GIB:.3g}"


NOTES = ("total: arguments + outputs + temporaries, less the donated buffers reused as outputs; "
         "relabel_step's adds the rest of the train state (optimizer moments, momentum model, queues), "
         "resident while it runs in training. TFLOP per chip: the step's model FLOPs (flops.py: XLA's "
         "count of the step with its layers unrolled, before partitioning and remat) over the chips; "
         "relabel_step's decoding loop is counted once, so its FLOPs are a lower bound and its speeds "
         "upper bounds. "
         f"examples/s: images (train_step) or captions (relabel_step) over all chips at {MFU:.0%} of "
         "the chip's bf16 peak.")


def markdown(reports: list[Report]) -> str:
  """One row per step per (config, topology, mesh): bytes per chip, FLOPs, speed at peak."""
  lines = [f"| config | slice | mesh (data,fsdp,tensor) | remat | step | batch | arguments | temporaries "
           f"| outputs | total GiB per chip | HBM GiB | fits | TFLOP per chip | ms per step at peak "
           f"| examples/s at {MFU:.0%} MFU | compile s |", "|" + "---|" * 16]
  for r in reports:
    chip, n = r.topology.chip, r.topology.chips
    for s in r.steps:
      speed = (f"{1e3 * step_seconds_at_peak(s.flops, chip.peak_tflops):.3g} | "
               f"{examples_per_s(s.batch, s.flops, chip.peak_tflops):.3g}") if s.flops else "- | -"
      tflop = f"{s.flops / 1e12:.3g}" if s.flops else "-"
      lines.append(f"| {r.config} | {r.topology.name} ({n} chip{'s' * (n > 1)}) | {','.join(map(str, r.mesh))} "
                   f"| {r.remat} | {s.step} | {s.batch} | {_gib(s.argument)} | {_gib(s.temp)} | {_gib(s.output)} "
                   f"| {_gib(s.total)} | {chip.hbm_gib:g} | {'yes' if fits(s.total, chip.hbm_gib) else 'NO'} "
                   f"| {tflop} | {speed} | {s.compile_s:.0f} |")
  chips = {r.topology.generation: (r.device_kind, r.topology.chip) for r in reports}
  lines += ["", "; ".join(f"{g}: {kind}, {c.hbm_gib:g} GiB HBM, {c.peak_tflops:g} TFLOP/s bf16 peak per chip"
                          for g, (kind, c) in chips.items()) + ".", NOTES]
  return "\n".join(lines) + "\n"


def not_fitting_message(report: Report, found: Report | None, tried: list) -> str:
  """What does not fit and by how much, and the mesh or remat policy that would (or that none
  of those tried does, and what else to change)."""
  chip = report.topology.chip
  needs = [f"{s.step} needs {_gib(s.total)} GiB per chip" if s.total is not None
           else f"the TPU compiler rejects {s.step} ({s.error[:200].rstrip('.')})"
           for s in report.steps if not fits(s.total, chip.hbm_gib)]
  where = (f"{report.config} does not fit {report.topology.name} ({chip.hbm_gib:g} GiB HBM per chip) on mesh "
           f"(data,fsdp,tensor)=({','.join(map(str, report.mesh))}) with remat {report.remat}: {'; '.join(needs)}.")
  if found is not None:
    flags = f"--mesh {','.join(map(str, found.mesh))}"
    if found.remat != report.remat:
      flags += f" --config.model.vision.remat={found.remat} --config.model.text.remat={found.remat}"
    worst_fit = max(s.total for s in found.steps)
    return f"{where} It fits with {flags} (compiled: {_gib(worst_fit)} GiB per chip at most)."
  summary = "; ".join(f"mesh {','.join(map(str, m))} remat {r}: {why}" for m, r, why in tried)
  advice = ["a slice with more chips" + (" and --mesh fsdp" if report.mesh[0] > 1 else ""),
            "a smaller --global-batch"]
  if report.remat != "full":
    advice.append("stricter remat (--config.model.vision.remat=full --config.model.text.remat=full)")
  return (f"{where} " + (f"No alternative tried fits ({summary}). " if tried else
                         "No alternative was compiled (--search 0). ")
          + f"Try {', '.join(advice[:-1])} or {advice[-1]}.")


def compile_all(config: ml_collections.ConfigDict, name: str, topologies: list[str], meshes: list[str],
                search_tries: int = 3, steps=("train", "relabel"), progress: bool = False) -> tuple[list[Report], str]:
  """`klip compile`: each topology x mesh compiled (meshes default to config.mesh.shape) ->
  (reports, '' when everything fits, else what does not and what would, from compiling up to
  `search_tries` alternatives per report that does not fit). `progress`: a bar on stderr (an
  unrolled ViT-B step can take 20 minutes to compile on two cores)."""
  parsed = [parse_topology(t) for t in topologies]  # every name checked before any compile
  shapes = [parse_mesh(m) for m in meshes] or [None]
  for topology in parsed:  # every mesh and batch too: a later slice's must not fail after base.py's ~20 min compile
    for shape in shapes:
      _check_batch(config, mesh_lib.resolve_shape(tuple(shape or config.mesh.shape), topology.chips))
  reports, problems = [], []
  with tqdm(total=len(parsed) * len(shapes), desc="klip compile", unit="mesh", disable=not progress) as bar:
    for topology in parsed:
      devices = tpu_devices(topology)
      for shape in shapes:
        bar.set_postfix_str(f"{topology.name} mesh {','.join(map(str, shape or config.mesh.shape))}")
        report = compile_report(config, topology, shape, name=name, devices=devices, steps=steps)
        reports.append(report)
        if not report.fits:
          bar.set_postfix_str(f"{topology.name}: searching for a mesh or remat policy that fits")
          problems.append(not_fitting_message(report, *search(config, report, search_tries, devices)))
        bar.update()
  return reports, "\n".join(problems)
