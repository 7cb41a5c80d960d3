#!/usr/bin/env bash
# Download a public data set with `datasets` and convert it into data/NAME/<kind>_<split>.jsonl.
#   scripts/download_data.sh NAME [--limit N] [--force] [--out DIR] [--test-fraction F] [--seed S]
# NAME: hh_rlhf | ultrafeedback_binarized | imdb | tldr | sharegpt   (see data/README.md)
# The judge benchmarks (evaluate.judge) keep their upstream files and formats, unconverted:
#   scripts/download_data.sh mt_bench    [--force] [--out DIR]   FastChat's MT-Bench files -> data/mt_bench/
#   scripts/download_data.sh alpaca_eval [--force] [--out DIR]   AlpacaEval 2.0's references -> data/alpaca_eval/
# Needs the network (do not set HF_HUB_OFFLINE). Prints the record counts of every file written.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 NAME [--limit N] [--force] [--out DIR] [--test-fraction F] [--seed S]" >&2
  echo "NAME: hh_rlhf | ultrafeedback_binarized | imdb | tldr | sharegpt | mt_bench | alpaca_eval" >&2
  exit 2
fi
name="$1"
shift

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ -x .venv/bin/python ]]; then
  python=.venv/bin/python
else
  python=python3
fi

case "$name" in
  mt_bench | alpaca_eval) exec "$python" -m taxfree.eval.judge.download "$name" --out "data/$name" "$@" ;;
esac
exec "$python" -m taxfree.data.cli download "$name" --out "data/$name" "$@"
