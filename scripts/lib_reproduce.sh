# Shared by scripts/reproduce_*.sh (sourced, not run): run every stage of a preset in order,
# training stages under accelerate (scripts/launch.sh), the others through `taxfree run`.
# Each command checks that the stages before it finished (stage.json manifests), and a finished
# stage whose config and inputs are unchanged is skipped, so a reproduction can be re-run after
# an interruption and continues where it stopped.
#
# Environment (all optional):
#   ACCELERATE_CONFIG   accelerate config for every training stage (default: the preset's choice)
#   PRESETS             space-separated preset names to run (default: every preset of the paper)
#   DRY_RUN=1           print the commands instead of running them
#   NO_DOWNLOAD=1       never download data; fail if data/<name>/ is missing

die() { echo "error: $*" >&2; exit 2; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ -x .venv/bin/python ]]; then
  python=.venv/bin/python
else
  python=python3
fi

run() {  # print, then run unless DRY_RUN=1
  printf '+ '
  printf '%q ' "$@"
  echo
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    "$@"
  fi
}

selected() {  # selected NAME: is the preset in $PRESETS (or is PRESETS unset)?
  [[ -z "${PRESETS:-}" ]] && return 0
  local p
  for p in $PRESETS; do
    [[ "$p" == "$1" ]] && return 0
  done
  return 1
}

check_presets() {  # check_presets NAME...: every name in $PRESETS is one of this paper's presets
  local p known
  for p in ${PRESETS:-}; do
    known=0
    for name in "$@"; do [[ "$p" == "$name" ]] && known=1; done
    [[ $known == 1 ]] || die "PRESETS: '$p' is not a preset of this paper (have: $*)"
  done
}

ensure_data() {  # ensure_data NAME...: download data/NAME/ unless it is there
  local name
  for name in "$@"; do
    if [[ -d "data/$name" ]]; then
      continue
    fi
    if [[ "${NO_DOWNLOAD:-0}" == 1 ]]; then
      die "data/$name/ is missing: run scripts/download_data.sh $name"
    fi
    run scripts/download_data.sh "$name"
  done
}

preset_stages() {  # the stages a preset runs, in order (its `stages:` list, else the default plan)
  "$python" - "$1" <<'PY'
import sys
import yaml
from taxfree.pipeline.stages import STAGE_ORDER
data = yaml.safe_load(open(sys.argv[1], encoding="utf-8")) or {}
stages = data.get("stages")
if not stages:
    from taxfree.pipeline.config import load_config
    stages = load_config(sys.argv[1]).enabled_stages()
print(" ".join(s for s in STAGE_ORDER if s in stages))
PY
}

set_args() {  # the --set overrides among taxfree args (what `taxfree validate` takes too)
  local out=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --set) [[ $# -ge 2 ]] || die "--set needs SECTION.KEY=VALUE"; out+=(--set "$2"); shift 2 ;;
      --set=*) out+=("$1"); shift ;;
      *) shift ;;
    esac
  done
  if [[ ${#out[@]} -gt 0 ]]; then
    printf '%s\0' "${out[@]}"
  fi
}

check_args() {  # taxfree args only: options (--force, --set k=v), no stray words
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --set) [[ $# -ge 2 ]] || die "--set needs SECTION.KEY=VALUE"; shift 2 ;;
      -*) shift ;;
      *) die "unexpected argument '$1' (usage: $0 [--force] [--set SECTION.KEY=VALUE ...])" ;;
    esac
  done
}

run_preset() {  # run_preset CONFIG ACCELERATE_CONFIG [taxfree args ...]
  local config="$1" accel="${ACCELERATE_CONFIG:-$2}"
  shift 2
  local stages stage sets=()
  while IFS= read -r -d '' arg; do sets+=("$arg"); done < <(set_args "$@")
  echo "== $config (training stages under $accel)"
  run "$python" -m taxfree validate "$config" "${sets[@]}"
  stages="$(preset_stages "$config")" || die "$config: cannot read its stages"
  for stage in $stages; do
    case "$stage" in
      sft|rm|align) run scripts/launch.sh "$stage" "$config" "$accel" "$@" ;;
      # The ama stage trains a few logits in one process (it does not shard).
      ama) run scripts/launch.sh ama "$config" configs/accelerate/single_gpu.yaml "$@" ;;
      *) run "$python" -m taxfree run "$config" --stages "$stage" "$@" ;;
    esac
  done
}

report_paths() {  # report_paths CONFIG...: where each preset's report landed
  local config name
  echo "== reports"
  for config in "$@"; do
    name="$("$python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["name"])' "$config")"
    echo "runs/$name/report.md  (table), runs/$name/pareto.png  (reward vs tax), runs/$name/results.json"
  done
}
