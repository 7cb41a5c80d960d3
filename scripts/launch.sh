#!/usr/bin/env bash
# Run one taxfree stage under `accelerate launch` (DDP, FSDP, DeepSpeed: see configs/accelerate/).
#   scripts/launch.sh STAGE CONFIG [ACCELERATE_CONFIG] [taxfree args ...]
# STAGE: a taxfree stage (sft, rm, align, ama, ...). ACCELERATE_CONFIG: a YAML under
# configs/accelerate/ (default: $ACCELERATE_CONFIG, else configs/accelerate/single_gpu.yaml).
# Everything after it goes to taxfree (e.g. --force, --set align.lr=5e-7).
# Runs from the repository root (like make): relative paths in the experiment config (data/...)
# and in the accelerate config (configs/deepspeed/...) resolve there.
# Environment: ACCELERATE_ARGS="--num_processes 4 --main_process_port 29600" adds flags to
# `accelerate launch`; DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

usage() {
  echo "usage: $0 STAGE CONFIG [ACCELERATE_CONFIG] [taxfree args ...]" >&2
  echo "STAGE: sft | rm | sample | align | merge | ama | evaluate | report" >&2
  exit 2
}
die() { echo "error: $*" >&2; exit 2; }

[[ $# -ge 2 ]] || usage
stage="$1"
config="$2"
shift 2
case "$stage" in
  pretrain|sft|rm|sample|align|merge|ama|evaluate|report) ;;
  -h|--help) usage ;;
  *) die "unknown stage '$stage' (sft, rm, sample, align, merge, ama, evaluate, report)" ;;
esac
accel="${ACCELERATE_CONFIG:-configs/accelerate/single_gpu.yaml}"
if [[ $# -gt 0 && "$1" != -* ]]; then
  accel="$1"
  shift
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
abspath() {  # an existing file, as an absolute path (relative to the caller's directory)
  [[ -f "$1" ]] || return 1
  echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
}
config_abs="$(abspath "$config")" || die "$config: experiment config not found"
if [[ -f "$accel" ]]; then
  accel_abs="$(abspath "$accel")"
elif [[ -f "$root/$accel" ]]; then
  accel_abs="$root/$accel"
else
  die "$accel: accelerate config not found (see configs/accelerate/README.md)"
fi
cd "$root"

if [[ -x .venv/bin/accelerate ]]; then
  accelerate=(.venv/bin/accelerate)
elif command -v accelerate >/dev/null 2>&1; then
  accelerate=(accelerate)
else
  die "accelerate is not installed (make venv)"
fi
extra=()
if [[ -n "${ACCELERATE_ARGS:-}" ]]; then
  read -r -a extra <<< "$ACCELERATE_ARGS"
fi

cmd=("${accelerate[@]}" launch --config_file "$accel_abs" "${extra[@]}" -m taxfree "$stage" "$config_abs" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
