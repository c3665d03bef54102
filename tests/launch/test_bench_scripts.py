"""launch/bench_gpu.sh hands launch/bench.sh a batch of 64 images for each GPU that jax will
see, and with --compare-hf shows jax one GPU (HF's BLIP runs on one; klip refuses to compare it
with ours on several). Run with stand-ins for nvidia-smi and bench.sh that record what they got."""

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the launch scripts are bash")

FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
# A machine with 8 GPUs.
if [[ $1 == -L ]]; then for i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA H100 80GB HBM3"; done; fi
"""
FAKE_BENCH = """#!/usr/bin/env bash
# Records its arguments, one a line, and the GPUs it was shown.
printf '%s\\n' "$@" > "$RECORD"
echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}" >> "$RECORD"
"""


def bench_gpu(tmp_path, *args: str, visible: str | None = None) -> list[str]:
  launch, bin_dir = tmp_path / "launch", tmp_path / "bin"
  launch.mkdir()
  bin_dir.mkdir()
  shutil.copy(ROOT / "launch" / "bench_gpu.sh", launch)
  for path, text in ((launch / "bench.sh", FAKE_BENCH), (bin_dir / "nvidia-smi", FAKE_NVIDIA_SMI)):
    path.write_text(text)
    path.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", RECORD=str(tmp_path / "record"))
  if visible is not None:
    env["CUDA_VISIBLE_DEVICES"] = visible
  result = subprocess.run(["bash", str(launch / "bench_gpu.sh"), *args], capture_output=True, text=True,
                          timeout=60, env=env)
  assert result.returncode == 0, result.stderr
  return (tmp_path / "record").read_text().splitlines()


def test_every_gpu_takes_64_images(tmp_path):
  assert bench_gpu(tmp_path, "configs/small.py", "out.json") == [
      "cuda", "configs/small.py", "out.json", "--config.train.batch_size=512", "CUDA_VISIBLE_DEVICES=unset"]


def test_the_gpus_jax_is_shown_set_the_batch(tmp_path):
  assert bench_gpu(tmp_path, visible="2,5")[3:] == ["--config.train.batch_size=128", "CUDA_VISIBLE_DEVICES=2,5"]


@pytest.mark.parametrize("visible,shown", [(None, "0"), ("3,4", "3")])
def test_compare_hf_runs_on_one_gpu(tmp_path, visible, shown):
  record = bench_gpu(tmp_path, "configs/base.py", "out.json", "--compare-hf", "--rounds", "3", visible=visible)
  assert record == ["cuda", "configs/base.py", "out.json", "--config.train.batch_size=64", "--compare-hf",
                    "--rounds", "3", f"CUDA_VISIBLE_DEVICES={shown}"]


FAKE_PYTHON3 = """#!/usr/bin/env bash
# `python3 -m venv DIR`: a venv whose python does nothing and whose klip records its arguments.
mkdir -p "$3/bin"
printf '#!/usr/bin/env bash\\nexit 0\\n' > "$3/bin/python"
printf '#!/usr/bin/env bash\\nprintf "%%s\\\\n" "$@" > "$RECORD"\\n' > "$3/bin/klip"
chmod +x "$3/bin/python" "$3/bin/klip"
echo "PATH=$3/bin:\\$PATH" > "$3/bin/activate"
"""


def test_bench_reads_and_writes_paths_where_it_was_called(tmp_path):
  # bench.sh changed into the repository before reading CONFIG and OUT: a relative OUT landed in
  # the repository and a relative CONFIG was looked up there.
  repo, caller, bin_dir = tmp_path / "repo", tmp_path / "caller", tmp_path / "bin"
  for folder in (repo / "launch", caller / "configs", bin_dir):
    folder.mkdir(parents=True)
  shutil.copy(ROOT / "launch" / "bench.sh", repo / "launch")
  (caller / "configs" / "mine.py").write_text("")
  (bin_dir / "python3").write_text(FAKE_PYTHON3)
  (bin_dir / "python3").chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(tmp_path / "record")}
  result = subprocess.run(["bash", str(repo / "launch" / "bench.sh"), "cuda", "configs/mine.py:48px", "out/b.json",
                           "--compare-hf"], capture_output=True, text=True, timeout=60, env=env, cwd=caller)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "record").read_text().splitlines() == [
      "bench", "train", "caption", "relabel", "--config", f"{caller}/configs/mine.py:48px",
      "--json", f"{caller}/out/b.json", "--compare-hf"]
