#!/usr/bin/env bash
# klip pretrain on a Cloud TPU VM slice, one host or many: create the slice, install klip_jax
# on every worker, run `klip pretrain --distributed` on all workers at once (every host runs
# the same program; jax.distributed.initialize() finds the others), delete the slice.
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND --name NAME --zone ZONE [options] [--dry-run] [-- --config.a.b=value ...]

Commands:
  create   create the TPU VM slice (needs --accelerator, --runtime)
  install  put klip_jax on every worker and pip install it with jax's TPU build
  run      run klip pretrain --distributed on every worker (needs --workdir)
  up       create, install, run
  delete   delete the slice

Options:
  --name NAME            TPU VM name
  --zone ZONE            e.g. us-west4-a
  --project PROJECT      default: gcloud's configured project
  --accelerator TYPE     e.g. v5litepod-16 (4 hosts of 4 chips), v4-32, v6e-8
  --runtime VERSION      TPU software version, e.g. v2-alpha-tpuv5-lite (v5e), tpu-ubuntu2204-base (v4)
  --spot                 create a Spot slice (cheaper, can be preempted; runs resume from checkpoints)
  --repo URL             git clone URL on every worker; default: copy this checkout (git archive)
  --ref REF              commit, branch or tag to install (default: HEAD)
  --config FILE[:VAR]    default: configs/base.py
  --workdir DIR          run directory every worker sees: a gcsfuse or NFS mount, or gs://
  --data-dir DIR         ArrayRecord dataset at a local path on every worker: a disk copy or a mount,
                         not gs:// (default: synthesise the embedded world into a mounted --workdir)
  --dry-run              print the commands, run nothing
  -- OVERRIDES           klip config overrides, e.g. -- --config.mesh.shape='(1,-1,1)' --config.train.steps=1000
EOF
}

COMMAND="" NAME="" ZONE="" PROJECT="" ACCELERATOR="" RUNTIME="" SPOT=0 REPO="" REF="HEAD"
CONFIG="configs/base.py" WORKDIR="" DATA_DIR="" OVERRIDES=()
while (( $# )); do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift ;;
    --zone) need_value "$@"; ZONE=$2; shift ;;
    --project) need_value "$@"; PROJECT=$2; shift ;;
    --accelerator) need_value "$@"; ACCELERATOR=$2; shift ;;
    --runtime) need_value "$@"; RUNTIME=$2; shift ;;
    --spot) SPOT=1 ;;
    --repo) need_value "$@"; REPO=$2; shift ;;
    --ref) need_value "$@"; REF=$2; shift ;;
    --config) need_value "$@"; CONFIG=$2; shift ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift ;;
    --data-dir) need_value "$@"; DATA_DIR=$2; shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    -*) die "unknown option $1" ;;
    *) [[ -z $COMMAND ]] || die "one command at a time (got $COMMAND and $1)"; COMMAND=$1 ;;
  esac
  shift
done
case $COMMAND in
  create|install|run|up|delete) ;;
  "") die "no command given" ;;
  *) die "unknown command $COMMAND" ;;
esac
require NAME ZONE
check_overrides "${OVERRIDES[@]}"

# Flags every gcloud tpu-vm command takes.
WHERE=(--zone="$ZONE")
[[ -z $PROJECT ]] || WHERE+=(--project="$PROJECT")

create() {
  require ACCELERATOR RUNTIME
  local spot=()
  (( ! SPOT )) || spot=(--spot)
  run gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" \
    --version="$RUNTIME" "${spot[@]}"
}

# On every worker: the code in ~/klip_jax (a clone of --repo, or this checkout's --ref copied
# over), installed in a virtual environment ~/klip-venv with the [tpu,gcs] extras (gcs: gs://
# workdirs). One && chain, so the first failure stops it and gcloud reports it; apt waits out
# the package lock that unattended upgrades hold on a freshly booted VM.
install_klip() {
  local fetch apt="sudo apt-get -qq -o DPkg::Lock::Timeout=600"
  if [[ -n $REPO ]]; then
    fetch="git clone -q $(quote_inner "$REPO") ~/klip_jax && git -C ~/klip_jax checkout -q $(quote_inner "$REF")"
  else
    local archive="/tmp/klip_jax-$NAME.tar.gz"
    run git -C "$(cd "$(dirname "$0")/.." && pwd)" archive --format=tar.gz --output="$archive" "$REF"
    run gcloud compute tpus tpu-vm scp "$archive" "$NAME:klip_jax.tar.gz" "${WHERE[@]}" --worker=all
    fetch="mkdir ~/klip_jax && tar -xzf ~/klip_jax.tar.gz -C ~/klip_jax"
  fi
  run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=all --command \
    "$apt update && $apt install -y python3-venv git && rm -rf ~/klip_jax ~/klip-venv && $fetch && python3 -m venv ~/klip-venv && ~/klip-venv/bin/pip install -q --upgrade pip && cd ~/klip_jax && ~/klip-venv/bin/pip install -q -e \".[tpu,gcs]\""
}

# Every worker runs the same klip command; --distributed joins them into one JAX program.
run_pretrain() {
  require WORKDIR
  local klip=(pretrain --distributed --config "$CONFIG" --workdir "$WORKDIR")
  [[ -z $DATA_DIR ]] || klip+=(--config.data.data_dir="$DATA_DIR")
  klip+=("${OVERRIDES[@]}")
  run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=all --command \
    "cd ~/klip_jax && ~/klip-venv/bin/klip $(join_inner "${klip[@]}")"
}

delete() {
  run gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
}

case $COMMAND in
  create) create ;;
  install) install_klip ;;
  run) run_pretrain ;;
  up) require ACCELERATOR RUNTIME WORKDIR; create; install_klip; run_pretrain ;;
  delete) delete ;;
esac
