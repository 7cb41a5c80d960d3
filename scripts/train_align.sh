#!/usr/bin/env bash
# Train every align.methods x align.optimizers variant (DPO/IPO/KTO/EXO x AdamW/OnDARE/OnTIES) under accelerate.
#   scripts/train_align.sh CONFIG [ACCELERATE_CONFIG] [taxfree args ...]
# ACCELERATE_CONFIG: configs/accelerate/{single_gpu,ddp,fsdp,fsdp1,zero2,zero3,multinode_zero3}.yaml
# (default: $ACCELERATE_CONFIG, else single_gpu.yaml). Same as
#   accelerate launch --config_file ACCELERATE_CONFIG -m taxfree align CONFIG [taxfree args ...]
# from the repository root; see scripts/launch.sh for DRY_RUN and ACCELERATE_ARGS.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 CONFIG [ACCELERATE_CONFIG] [taxfree args ...]" >&2
  exit 2
fi
exec "$(dirname "${BASH_SOURCE[0]}")/launch.sh" align "$@"
