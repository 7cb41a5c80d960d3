#!/usr/bin/env bash
# Download a public data set with `datasets` and convert it into data/NAME/<kind>_<split>.jsonl.
#   scripts/download_data.sh NAME [--limit N] [--force] [--out DIR] [--test-fraction F] [--seed S]
# NAME: hh_rlhf | ultrafeedback_binarized | imdb | tldr | sharegpt   (see data/README.md)
# Needs the network (do not set HF_HUB_OFFLINE). Prints the record counts of every file written.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 NAME [--limit N] [--force] [--out DIR] [--test-fraction F] [--seed S]" >&2
  echo "NAME: hh_rlhf | ultrafeedback_binarized | imdb | tldr | sharegpt" >&2
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

exec "$python" -m taxfree.data.cli download "$name" --out "data/$name" "$@"
