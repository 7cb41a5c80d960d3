#!/usr/bin/env bash
# Run one taxfree stage with mpirun over a hostfile (clusters that start jobs with MPI, not ssh).
#   scripts/launch_mpi.sh HOSTFILE NUM_PROCESSES STAGE CONFIG [ACCELERATE_CONFIG] [taxfree args ...]
# HOSTFILE is your MPI's (Open MPI: `node-1 slots=8`; MPICH / Intel MPI: `node-1:8`).
# NUM_PROCESSES: ranks in all (e.g. 16 for 2 nodes x 8 GPUs). ACCELERATE_CONFIG (default
# configs/accelerate/zero3.yaml) gives the DeepSpeed / FSDP settings exactly as `accelerate
# launch` would (python -m taxfree.distributed env). Every rank runs `python -m taxfree STAGE
# CONFIG`, which asks MPI (mpi4py) for its rank, local rank and rank 0's address
# (taxfree/distributed.py): no per-rank wrapper and no ssh.
# Every host needs this checkout, its .venv and the data at the same path. Environment:
# MPIRUN_ARGS adds mpirun flags (Open MPI forwards only what you name: "-x HF_HOME -x PATH");
# MASTER_ADDR / MASTER_PORT override rank 0's discovered address / port 29500;
# DRY_RUN=1 prints the command.
set -euo pipefail

usage() {
  echo "usage: $0 HOSTFILE NUM_PROCESSES STAGE CONFIG [ACCELERATE_CONFIG] [taxfree args ...]" >&2
  exit 2
}
die() { echo "error: $*" >&2; exit 2; }

[[ $# -ge 4 ]] || usage
hostfile="$1" np="$2" stage="$3" config="$4"
shift 4
[[ -f "$hostfile" ]] || die "$hostfile: hostfile not found"
[[ "$np" =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCESSES must be a positive integer, got '$np'"
case "$stage" in
  pretrain|sft|rm|sample|align|merge|ama|evaluate|report) ;;
  *) die "unknown stage '$stage' (sft, rm, sample, align, merge, ama, evaluate, report)" ;;
esac
[[ -f "$config" ]] || die "$config: experiment config not found"
accel="configs/accelerate/zero3.yaml"
if [[ $# -gt 0 && "$1" != -* ]]; then
  accel="$1"
  shift
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
abspath() { echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }
hostfile="$(abspath "$hostfile")"
config="$(abspath "$config")"
if [[ -f "$accel" ]]; then
  accel="$(abspath "$accel")"
elif [[ -f "$root/$accel" ]]; then
  accel="$root/$accel"
else
  die "$accel: accelerate config not found (see configs/accelerate/README.md)"
fi
cd "$root"

if [[ -x .venv/bin/python ]]; then
  python="$root/.venv/bin/python"
else
  python="$(command -v python3)"
fi
if [[ -x .venv/bin/mpirun ]]; then  # the `mpich` wheel installs one into the venv
  mpirun="$root/.venv/bin/mpirun"
else
  mpirun="$(command -v mpirun || command -v mpiexec || true)"
fi
[[ -n "$mpirun" ]] || die "mpirun not found (install Open MPI or MPICH, and mpi4py in the environment)"
"$python" -c "import mpi4py" 2>/dev/null || die "mpi4py is not installed in $python's environment (pip install mpi4py)"

envs=()
while IFS= read -r -d '' kv; do envs+=("$kv"); done < <("$python" -m taxfree.distributed env "$accel")
if "$mpirun" --version 2>&1 | grep -q "Open MPI"; then
  hostflag=(--hostfile "$hostfile")
else
  hostflag=(-f "$hostfile")
fi
extra=()
if [[ -n "${MPIRUN_ARGS:-}" ]]; then
  read -r -a extra <<< "$MPIRUN_ARGS"
fi
[[ -n "${MASTER_ADDR:-}" ]] && envs+=("MASTER_ADDR=$MASTER_ADDR")
[[ -n "${MASTER_PORT:-}" ]] && envs+=("MASTER_PORT=$MASTER_PORT")

# `env K=V ... python` sets the accelerate settings on every rank whatever the MPI flavour.
cmd=("$mpirun" "${hostflag[@]}" -n "$np" "${extra[@]}" env "${envs[@]}" "$python" -m taxfree "$stage" "$config" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
