"""The launch scripts' --dry-run output: the exact gcloud and kubectl commands, parsed back the
way a shell (and, for ssh --command, the worker's shell) would read them, and the JobSet
manifest parsed as YAML. The klip arguments they carry must load as a valid config."""

import pathlib
import shlex
import shutil
import subprocess

import pytest
import yaml

from klip_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the launch scripts are bash")

SLICE = ["--name", "klip-pod", "--zone", "us-west4-a", "--project", "my-proj"]
OVERRIDES = ["--", "--config.mesh.shape=(1,-1,1)", "--config.train.steps=1000"]


def launch(script: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True, text=True,
                        timeout=60, cwd=ROOT)


def dry_run(script: str, *args: str) -> list[list[str]]:
  """Each printed command as the argument list a shell would run."""
  result = launch(script, "--dry-run", *args)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def remote(command: list[str]) -> list[list[str]]:
  """The `--command` of a gcloud ssh line as the worker's shell runs it: && steps, each an argv."""
  script = command[command.index("--command") + 1]
  return [shlex.split(step) for step in script.split(" && ")]


def assert_valid_config(argv: list[str]) -> None:
  """klip's own config loader accepts the --config file and overrides of a klip command line."""
  spec = argv[argv.index("--config") + 1]
  config = config_lib.load(str(ROOT / spec), [a for a in argv if a.startswith("--config.")])
  config_lib.validate(config)


def test_tpu_vm_up_creates_installs_and_runs_on_every_worker():
  create, archive, scp, install, run = dry_run(
      "tpu_vm.sh", "up", *SLICE, "--accelerator", "v5litepod-16", "--runtime", "v2-alpha-tpuv5-lite", "--spot",
      "--workdir", "/mnt/shared/runs/base", "--data-dir", "/mnt/shared/data", *OVERRIDES)
  where = ["--zone=us-west4-a", "--project=my-proj"]
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "klip-pod", *where,
                    "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"]
  assert archive == ["git", "-C", str(ROOT), "archive", "--format=tar.gz", "--output=/tmp/klip_jax-klip-pod.tar.gz",
                     "HEAD"]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/klip_jax-klip-pod.tar.gz",
                 "klip-pod:klip_jax.tar.gz", *where, "--worker=all"]
  assert install[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "klip-pod", *where]
  assert install[8:10] == ["--worker=all", "--command"]
  steps = remote(install)
  assert ["tar", "-xzf", "~/klip_jax.tar.gz", "-C", "~/klip_jax"] in steps
  assert steps[-2:] == [["cd", "~/klip_jax"], ["~/klip-venv/bin/pip", "install", "-q", "-e", ".[tpu,gcs]"]]

  assert run[:10] == install[:10]
  cd, klip = remote(run)
  assert cd == ["cd", "~/klip_jax"]
  assert klip == ["~/klip-venv/bin/klip", "pretrain", "--distributed", "--config", "configs/base.py",
                  "--workdir", "/mnt/shared/runs/base", "--config.data.data_dir=/mnt/shared/data",
                  "--config.mesh.shape=(1,-1,1)", "--config.train.steps=1000"]
  assert_valid_config(klip)


def test_tpu_vm_install_from_git_and_delete():
  (install,) = dry_run("tpu_vm.sh", "install", "--name", "klip-pod", "--zone", "europe-west4-b",
                       "--repo", "https://github.com/me/klip_jax.git", "--ref", "v0.1")
  assert "--project" not in " ".join(install)
  steps = remote(install)
  assert ["git", "clone", "-q", "https://github.com/me/klip_jax.git", "~/klip_jax"] in steps
  assert ["git", "-C", "~/klip_jax", "checkout", "-q", "v0.1"] in steps
  assert dry_run("tpu_vm.sh", "delete", "--name", "klip-pod", "--zone", "europe-west4-b") == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "klip-pod", "--zone=europe-west4-b", "--quiet"]]


def test_tpu_vm_quoting_survives_both_shells():
  """Overrides with spaces and quotes reach klip on the worker unchanged."""
  odd = ["--config.eval.tasks=retrieval,itm", "--config.data.data_dir=/mnt/my data/it's", '--config.x="$HOME"']
  (run,) = dry_run("tpu_vm.sh", "run", *SLICE, "--workdir", "gs://bucket/runs/a b", "--", *odd)
  _, klip = remote(run)
  assert klip[5:] == ["--workdir", "gs://bucket/runs/a b", *odd]


def jobset(*args: str) -> tuple[str, dict]:
  """The command line and the parsed manifest of `gke_jobset.sh apply --dry-run`."""
  result = launch("gke_jobset.sh", "--dry-run", "apply", "--name", "klip-ms", "--image",
                  "us-docker.pkg.dev/p/r/klip-jax:v1", "--workdir", "/shared/runs/base", *args)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[-1] == "EOF"
  assert subprocess.run(["bash", "-n"], input=result.stdout, text=True).returncode == 0
  return lines[0], yaml.safe_load("\n".join(lines[1:-1]))


def test_jobset_spans_slices_with_data_parallelism_over_dcn():
  command, manifest = jobset("--slices", "2", "--tpu", "v5e", "--topology", "4x4", "--data-dir", "/shared/data",
                             "--pvc", "klip-filestore", *OVERRIDES)
  assert command == "kubectl apply -f - <<'EOF'"
  assert (manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"]) == (
      "jobset.x-k8s.io/v1alpha2", "JobSet", "klip-ms")
  assert manifest["metadata"]["annotations"] == {
      "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
  (job,) = manifest["spec"]["replicatedJobs"]
  assert job["replicas"] == 2
  spec = job["template"]["spec"]
  assert (spec["parallelism"], spec["completions"], spec["backoffLimit"]) == (4, 4, 0)
  pod = spec["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                 "cloud.google.com/gke-tpu-topology": "4x4"}
  (container,) = pod["containers"]
  assert container["workingDir"] == "/klip_jax"  # where launch/Dockerfile puts configs/
  assert container["resources"]["limits"] == {"google.com/tpu": 4}
  assert container["command"] == ["klip", "pretrain", "--distributed", "--config", "configs/base.py",
                                  "--workdir", "/shared/runs/base", "--config.mesh.dcn_shape=(2,1,1)",
                                  "--config.data.data_dir=/shared/data", "--config.mesh.shape=(1,-1,1)",
                                  "--config.train.steps=1000"]
  assert_valid_config(container["command"])
  assert container["volumeMounts"] == [{"name": "shared", "mountPath": "/shared"}]
  assert pod["volumes"] == [{"name": "shared", "persistentVolumeClaim": {"claimName": "klip-filestore"}}]


def test_jobset_3d_topology_and_explicit_dcn_shape():
  _, manifest = jobset("--slices", "4", "--tpu", "v5p", "--topology", "2x2x4", "--dcn-shape", "(2,2,1)",
                       "--max-restarts", "3")
  assert manifest["spec"]["failurePolicy"] == {"maxRestarts": 3}
  (job,) = manifest["spec"]["replicatedJobs"]
  assert (job["replicas"], job["template"]["spec"]["parallelism"]) == (4, 4)
  pod = job["template"]["spec"]["template"]["spec"]
  assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v5p-slice"
  assert "--config.mesh.dcn_shape=(2,2,1)" in pod["containers"][0]["command"]
  assert "volumes" not in pod


def test_jobset_delete():
  assert dry_run("gke_jobset.sh", "delete", "--name", "klip-ms") == [["kubectl", "delete", "jobset", "klip-ms"]]


@pytest.mark.parametrize("script,args,message", [
    ("tpu_vm.sh", [], "no command given"),
    ("tpu_vm.sh", ["run", "--zone", "z"], "run needs --name"),
    ("tpu_vm.sh", ["run", "--name", "n", "--zone", "z"], "run needs --workdir"),
    ("tpu_vm.sh", ["create", "--name", "n", "--zone", "z", "--runtime", "v2-alpha-tpuv5-lite"],
     "create needs --accelerator"),
    ("tpu_vm.sh", ["run", "--name", "n", "--zone", "z", "--workdir", "w", "--", "--steps=5"],
     "'--steps=5' is not a config override"),
    ("tpu_vm.sh", ["run", "--name", "--zone", "z"], "--name needs a value"),
    ("tpu_vm.sh", ["start", "--name", "n", "--zone", "z"], "unknown command start"),
    ("gke_jobset.sh", ["apply", "--name", "ms", "--slices", "2", "--tpu", "v5e", "--topology", "4x4",
                       "--workdir", "w"], "apply needs --image"),
    ("gke_jobset.sh", ["apply", "--name", "ms", "--slices", "2", "--tpu", "v5e", "--topology", "4x4",
                       "--image", "i"], "apply needs --workdir"),
    ("gke_jobset.sh", ["apply", "--name", "ms", "--slices", "0", "--tpu", "v5e", "--topology", "4x4",
                       "--image", "i", "--workdir", "w"], "--slices 0"),
    ("gke_jobset.sh", ["apply", "--name", "ms", "--slices", "2", "--tpu", "v3", "--topology", "4x4",
                       "--image", "i", "--workdir", "w"], "--tpu v3"),
    ("gke_jobset.sh", ["apply", "--name", "ms", "--slices", "2", "--tpu", "v5e", "--topology", "4by4",
                       "--image", "i", "--workdir", "w"], "--topology 4by4"),
    ("gke_jobset.sh", ["delete", "--name", "My_Job"], "--name My_Job"),
])
def test_missing_or_bad_parameters_exit_with_usage(script, args, message):
  result = launch(script, "--dry-run", *args)
  assert result.returncode == 2
  assert result.stdout == ""
  assert f"error: {message}" in result.stderr
  assert f"Usage: launch/{script}" in result.stderr
