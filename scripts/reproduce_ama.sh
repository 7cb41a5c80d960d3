#!/usr/bin/env bash
# Reproduce the AMA paper (arXiv 2309.06256): OpenLLaMA-3B on HH-RLHF: SFT, RM, DPO, the
# aligned-weight sweep, partwise averaging, AMA on the aligned policy's best-of-K samples, evaluation and the report
# (reward vs the `ama_paper` benchmark average).
#   scripts/reproduce_ama.sh [taxfree args ...]        (or: make reproduce-ama)
# Needs GPUs (8 per node by default) and the hub. Environment: see scripts/lib_reproduce.sh
# (ACCELERATE_CONFIG, PRESETS, DRY_RUN, NO_DOWNLOAD).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib_reproduce.sh"

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then sed -n '2,8p' "$0"; exit 0; fi
check_args "$@"
check_presets ama_openllama_3b_hh
ensure_data hh_rlhf mt_bench alpaca_eval  # the judge's data too (evaluate.judge)

configs=()
selected ama_openllama_3b_hh && { run_preset configs/experiments/ama_openllama_3b_hh.yaml configs/accelerate/zero2.yaml "$@"; configs+=(configs/experiments/ama_openllama_3b_hh.yaml); }
report_paths "${configs[@]}"
