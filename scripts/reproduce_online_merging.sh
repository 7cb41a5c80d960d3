#!/usr/bin/env bash
# Reproduce the online merging paper (arXiv 2405.17931): Qwen1.5-1.8B, Qwen1.5-7B and
# LLaMA-3-8B-Instruct on UltraFeedback-binarized, {DPO, IPO, KTO} x {AdamW, OnDARE, OnTIES},
# then each preset's report (benchmark average = the paper's Table 4 measure).
#   scripts/reproduce_online_merging.sh [taxfree args ...]        (or: make reproduce-online-merging)
# Needs GPUs (8 per node by default), the hub, the OpenCompass environment (make opencompass-env),
# and ALLOW_CODE_EXECUTION=1: the paper's HumanEval, MBPP and DS-1000 run model-written code, so
# run this in a sandbox. Environment: see scripts/lib_reproduce.sh (ACCELERATE_CONFIG, PRESETS,
# DRY_RUN, NO_DOWNLOAD).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib_reproduce.sh"

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then sed -n '2,10p' "$0"; exit 0; fi
check_args "$@"
if [[ "${ALLOW_CODE_EXECUTION:-0}" != 1 ]]; then
  die "the online merging benchmarks (HumanEval, MBPP, DS-1000) execute model-written code: run in a sandbox and set ALLOW_CODE_EXECUTION=1"
fi
check_presets online_merging_qwen1.5_1.8b online_merging_qwen1.5_7b online_merging_llama3_8b
ensure_data ultrafeedback_binarized mt_bench alpaca_eval  # the judge's data too (evaluate.judge)

configs=()
# preset                                                     training stages under
selected online_merging_qwen1.5_1.8b && { run_preset configs/experiments/online_merging_qwen1.5_1.8b.yaml configs/accelerate/ddp.yaml "$@"; configs+=(configs/experiments/online_merging_qwen1.5_1.8b.yaml); }
selected online_merging_qwen1.5_7b && { run_preset configs/experiments/online_merging_qwen1.5_7b.yaml configs/accelerate/fsdp.yaml "$@"; configs+=(configs/experiments/online_merging_qwen1.5_7b.yaml); }
selected online_merging_llama3_8b && { run_preset configs/experiments/online_merging_llama3_8b.yaml configs/accelerate/fsdp.yaml "$@"; configs+=(configs/experiments/online_merging_llama3_8b.yaml); }
report_paths "${configs[@]}"
