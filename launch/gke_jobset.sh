#!/usr/bin/env bash
# klip pretrain over several TPU slices on GKE: renders a JobSet (one replicated Job per slice,
# one pod per TPU host) whose pods all run `klip pretrain --distributed`, with
# config.mesh.dcn_shape putting data parallelism across the slices (DCN) while the ICI mesh
# axes (config.mesh.shape) stay inside each slice. GKE gives the pods the TPU and multi-slice
# environment that jax.distributed.initialize() reads. `apply` pipes the manifest into
# kubectl; --dry-run prints that command with the manifest as its here-document instead.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gke_jobset.sh COMMAND --name NAME [options] [--dry-run] [-- --config.a.b=value ...]

Commands:
  apply    render the JobSet and kubectl apply it (needs --slices, --tpu, --topology, --image, --workdir)
  delete   kubectl delete the JobSet

Options:
  --name NAME            JobSet name (lower case letters, digits, -)
  --slices N             number of TPU slices (node pools of one type and topology), >= 1
  --tpu TYPE             v4, v5e, v5p or v6e
  --topology TOPOLOGY    chips of one slice, e.g. 4x4 (v5e, v6e) or 2x2x4 (v4, v5p)
  --chips-per-host N     TPU chips per host VM (default 4)
  --image IMAGE          container image with klip_jax[tpu,gcs] installed and the repository at
                         /klip_jax, the working directory (launch/Dockerfile builds one)
  --config FILE[:VAR]    default: configs/base.py
  --workdir DIR          run directory every pod sees: gs://, or under --mount
  --data-dir DIR         ArrayRecord dataset at a local path in every pod: under --mount, not gs://
                         (default: synthesise the embedded world into a mounted --workdir)
  --dcn-shape SHAPE      config.mesh.dcn_shape, slices per (data, fsdp, tensor) axis (default: (N,1,1))
  --pvc CLAIM            a ReadWriteMany PersistentVolumeClaim (Filestore, NFS) to mount in every pod
  --mount DIR            where --pvc is mounted (default /shared)
  --max-restarts N       JobSet restarts of the whole run after a failure (default 0); runs resume
  --dry-run              print the command and manifest, run nothing
  -- OVERRIDES           klip config overrides, e.g. -- --config.mesh.shape='(1,-1,1)'
EOF
}

COMMAND="" NAME="" SLICES="" TPU="" TOPOLOGY="" CHIPS_PER_HOST=4 IMAGE="" CONFIG="configs/base.py"
WORKDIR="" DATA_DIR="" DCN_SHAPE="" PVC="" MOUNT="/shared" MAX_RESTARTS=0 OVERRIDES=()
while (( $# )); do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift ;;
    --slices) need_value "$@"; SLICES=$2; shift ;;
    --tpu) need_value "$@"; TPU=$2; shift ;;
    --topology) need_value "$@"; TOPOLOGY=$2; shift ;;
    --chips-per-host) need_value "$@"; CHIPS_PER_HOST=$2; shift ;;
    --image) need_value "$@"; IMAGE=$2; shift ;;
    --config) need_value "$@"; CONFIG=$2; shift ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift ;;
    --data-dir) need_value "$@"; DATA_DIR=$2; shift ;;
    --dcn-shape) need_value "$@"; DCN_SHAPE=$2; shift ;;
    --pvc) need_value "$@"; PVC=$2; shift ;;
    --mount) need_value "$@"; MOUNT=$2; shift ;;
    --max-restarts) need_value "$@"; MAX_RESTARTS=$2; shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    -*) die "unknown option $1" ;;
    *) [[ -z $COMMAND ]] || die "one command at a time (got $COMMAND and $1)"; COMMAND=$1 ;;
  esac
  shift
done
case $COMMAND in
  apply|delete) ;;
  "") die "no command given" ;;
  *) die "unknown command $COMMAND" ;;
esac
require NAME
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name $NAME: use lower case letters, digits and -"

if [[ $COMMAND == delete ]]; then
  run kubectl delete jobset "$NAME"
  exit 0
fi

require SLICES TPU TOPOLOGY IMAGE WORKDIR
check_overrides "${OVERRIDES[@]}"
[[ $SLICES =~ ^[1-9][0-9]*$ ]] || die "--slices $SLICES: give a whole number >= 1"
[[ $CHIPS_PER_HOST =~ ^[1-9][0-9]*$ ]] || die "--chips-per-host $CHIPS_PER_HOST: give a whole number >= 1"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts $MAX_RESTARTS: give a whole number >= 0"
# GKE's node label for each TPU generation.
case $TPU in
  v4) ACCELERATOR=tpu-v4-podslice ;;
  v5e) ACCELERATOR=tpu-v5-lite-podslice ;;
  v5p) ACCELERATOR=tpu-v5p-slice ;;
  v6e) ACCELERATOR=tpu-v6e-slice ;;
  *) die "--tpu $TPU: use v4, v5e, v5p or v6e" ;;
esac
[[ $TOPOLOGY =~ ^[1-9][0-9]*(x[1-9][0-9]*){1,2}$ ]] || die "--topology $TOPOLOGY: give chips per dimension, e.g. 4x4 or 2x2x4"
CHIPS=$(( ${TOPOLOGY//x/*} ))
(( CHIPS % CHIPS_PER_HOST == 0 )) || die "--topology $TOPOLOGY: $CHIPS chips do not fill hosts of $CHIPS_PER_HOST"
HOSTS=$(( CHIPS / CHIPS_PER_HOST ))
DCN_SHAPE=${DCN_SHAPE:-"($SLICES,1,1)"}

# The container's command, one argument per list item (no shell, so no quoting to get wrong).
KLIP=(klip pretrain --distributed --config "$CONFIG" --workdir "$WORKDIR" --config.mesh.dcn_shape="$DCN_SHAPE")
[[ -z $DATA_DIR ]] || KLIP+=(--config.data.data_dir="$DATA_DIR")
KLIP+=("${OVERRIDES[@]}")

# A YAML double-quoted string.
yaml_str() {
  local s=${1//\\/\\\\}
  printf '"%s"' "${s//\"/\\\"}"
}

# The JobSet: `replicas` slices, each a Job of one pod per host. The exclusive-topology
# annotation gives each Job a node pool (a slice) of its own; hostNetwork is what GKE's
# multi-slice guide asks of TPU pods for DCN throughput; backoffLimit 0 fails the whole
# JobSet when any pod fails, since no process of a JAX program can be replaced on its own.
render() {
  cat <<EOF
# klip pretrain on $SLICES x $TPU $TOPOLOGY slices ($HOSTS hosts of $CHIPS_PER_HOST chips each), mesh.dcn_shape=$DCN_SHAPE
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: $NAME
  annotations:
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  failurePolicy:
    maxRestarts: $MAX_RESTARTS
  replicatedJobs:
  - name: slice
    replicas: $SLICES
    template:
      spec:
        parallelism: $HOSTS
        completions: $HOSTS
        completionMode: Indexed
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
            hostNetwork: true
            dnsPolicy: ClusterFirstWithHostNet
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: $ACCELERATOR
              cloud.google.com/gke-tpu-topology: $TOPOLOGY
            containers:
            - name: klip
              image: $(yaml_str "$IMAGE")
              workingDir: /klip_jax
              ports:
              - containerPort: 8471
              - containerPort: 8080
              command:
EOF
  local arg
  for arg in "${KLIP[@]}"; do
    echo "              - $(yaml_str "$arg")"
  done
  cat <<EOF
              resources:
                limits:
                  google.com/tpu: $CHIPS_PER_HOST
EOF
  [[ -z $PVC ]] || cat <<EOF
              volumeMounts:
              - name: shared
                mountPath: $(yaml_str "$MOUNT")
            volumes:
            - name: shared
              persistentVolumeClaim:
                claimName: $(yaml_str "$PVC")
EOF
}

if (( DRY_RUN )); then
  echo "kubectl apply -f - <<'EOF'"
  render
  echo "EOF"
else
  render | kubectl apply -f -
fi
