# Shared by the stage launchers (sourced, not run); the values of each run are in recipes/<real|smoke>/<stage>.yaml.
# Each launcher:
#   - runs at real size by default: one GPU (the seed's budget: one 40 GB card);
#   - NUM_GPUS=N (N > 1) runs data-parallel on N GPUs of one machine (scripts/configs/multi_gpu.yaml), or with
#     ACCELERATE_CONFIG=scripts/configs/<fsdp|deepspeed_zero2|deepspeed_zero3>.yaml for sharded training;
#   - SMOKE=1 (or --smoke) runs a tiny variant on the CPU with offline data made on the spot (seconds to a minute);
#     with NUM_PROCESSES=2 it runs on two CPU processes (gloo, scripts/configs/cpu_multiprocess.yaml);
#   - DRY_RUN=1 (or --dry-run) checks the data paths and prints the commands without running them;
#   - passes any argument to the stage script after the recipe file (a flag overrides the recipe's value).
# Everything runs from the repository root.

set -euo pipefail

RECIPE_NAME=$(basename "$0")
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO_ROOT"

SMOKE=${SMOKE:-0}
DRY_RUN=${DRY_RUN:-0}
EXTRA_ARGS=()
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    --dry-run | --dry_run) DRY_RUN=1 ;;
    *) EXTRA_ARGS+=("$arg") ;;
  esac
done

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
NUM_GPUS=${NUM_GPUS:-1}
NUM_PROCESSES=${NUM_PROCESSES:-1}

fail() {
  echo "$RECIPE_NAME: error: $*" >&2
  exit 2
}

# require_file PATH WHAT VARIABLE: a clear error naming the missing path and the variable that sets it.
require_file() {
  [[ -f "$1" ]] || fail "$2 not found: $1 (set $3=...)"
}

require_dir() {
  [[ -d "$1" ]] || fail "$2 not found: $1 (set $3=...)"
}

# require_model NAME_OR_PATH WHAT VARIABLE: a local folder must exist; a hub id (org/name, where no local folder
# "org" exists) is fetched by the stage script, which needs the Hub (HF_HUB_OFFLINE=1 forbids it).
require_model() {
  if [[ -d "$1" ]]; then return; fi
  if [[ "$1" =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ && ! -e "${1%%/*}" && "$1" != .* ]]; then
    [[ "${HF_HUB_OFFLINE:-0}" == 1 ]] && fail "$2 '$1' is not a local folder and HF_HUB_OFFLINE=1 (set $3=...)"
    echo "$RECIPE_NAME: note: $2 '$1' is not a local folder: it will be fetched from the Hugging Face Hub"
    return
  fi
  fail "$2 not found: $1 (set $3=...)"
}

# The command that starts a stage script: plain python for one CPU process, accelerate launch otherwise.
launcher() {
  if [[ "$SMOKE" == 1 ]]; then
    if [[ "$NUM_PROCESSES" -gt 1 ]]; then
      echo accelerate launch --config_file scripts/configs/cpu_multiprocess.yaml --num_processes "$NUM_PROCESSES"
    else
      echo "$PYTHON"
    fi
  elif [[ "$NUM_GPUS" -gt 1 ]]; then
    echo accelerate launch --config_file "${ACCELERATE_CONFIG:-scripts/configs/multi_gpu.yaml}" \
      --num_processes "$NUM_GPUS"
  else
    echo accelerate launch --config_file "${ACCELERATE_CONFIG:-scripts/configs/single_gpu.yaml}"
  fi
}

# size_flags: the recipe values a user overrides through the environment (MAX_STEPS, MICRO_BATCH, GRAD_ACCUM,
# EPOCHS, MAX_LENGTH), as flags after the recipe file; unset ones keep the recipe's.
size_flags() {
  local flags=()
  [[ -n "${MAX_STEPS:-}" ]] && flags+=(--max_steps "$MAX_STEPS")
  [[ -n "${MICRO_BATCH:-}" ]] && flags+=(--per_device_train_batch_size "$MICRO_BATCH")
  [[ -n "${GRAD_ACCUM:-}" ]] && flags+=(--gradient_accumulation_steps "$GRAD_ACCUM")
  [[ -n "${EPOCHS:-}" ]] && flags+=(--num_train_epochs "$EPOCHS")
  [[ -n "${MAX_LENGTH:-}" ]] && flags+=(--max_length "$MAX_LENGTH")
  echo "${flags[@]}"
}

# start_smoke WHAT: announce a smoke run and make its offline data under SMOKE_ROOT (OUTPUT_ROOT, default outputs/smoke).
start_smoke() {
  describe "$1"
  SMOKE_ROOT=${OUTPUT_ROOT:-outputs/smoke}
  make_smoke_data "$SMOKE_ROOT/data"
}

# run_multimodal_smoke STAGE MODEL TRAIN_JSON EVAL_JSON: the stage's smoke recipe from MODEL on the smoke data, then
# exit.
run_multimodal_smoke() {
  read -ra LAUNCH <<< "$(launcher)"
  read -ra DATA <<< "$(smoke_data_flags "$3" "$4")"
  run "${LAUNCH[@]}" "scripts/$1.py" --config "recipes/smoke/$1.yaml" --model_name_or_path "$2" "${DATA[@]}" \
    --output_dir "${OUTPUT_DIR:-$SMOKE_ROOT/$1}" "${EXTRA_ARGS[@]}"
  exit 0
}

# smoke_data_flags TRAIN_JSON EVAL_JSON: the smoke data (synthetic, offline) with its held-out file.
smoke_data_flags() {
  echo --data_path "$SMOKE_ROOT/data/$1" --image_folder "$SMOKE_ROOT/data/images" \
    --eval_data_path "$SMOKE_ROOT/data/$2" --eval_image_folder "$SMOKE_ROOT/data/images"
}

# use_tiny_model VARIABLE: point VARIABLE at the smoke runs' tiny MM-Phi folder, building it on first use.
use_tiny_model() {
  local dir=$SMOKE_ROOT/mmphi-tiny
  [[ -f "$dir/config.json" ]] || run "$PYTHON" scripts/build_model.py --preset tiny --output_dir "$dir"
  printf -v "$1" '%s' "$dir"
}

# run COMMAND...: print it (shell-quoted, so it can be copied), then run it unless DRY_RUN=1.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "$DRY_RUN" != 1 ]]; then
    if [[ "$1" == accelerate ]]; then
      shift
      "$PYTHON" -m accelerate.commands.launch "$@"
    else
      "$@"
    fi
  fi
}

describe() {
  local mode="real size, 1 GPU"
  [[ "$NUM_GPUS" -gt 1 ]] && mode="real size, $NUM_GPUS GPUs ($(basename "${ACCELERATE_CONFIG:-multi_gpu.yaml}"))"
  [[ "$SMOKE" == 1 ]] && mode="SMOKE: tiny, CPU, $NUM_PROCESSES process(es)"
  local note=""
  [[ "$DRY_RUN" == 1 ]] && note=" (dry run: nothing is started)"
  echo "== $RECIPE_NAME: $1 [$mode]$note"
}

# The offline tiny data shared by the smoke runs: synthetic shape images with COCO captions and LLaVA
# conversations, and the captions again as a RedPajama-style JSONL corpus for pretrain.
make_smoke_data() {
  local dir=$1
  if [[ ! -f "$dir/captions_train.json" ]]; then
    run "$PYTHON" scripts/make_synthetic_data.py --output_dir "$dir" --num_images "${SMOKE_IMAGES:-32}" --seed 0
  fi
  if [[ ! -f "$dir/corpus.jsonl" && "$DRY_RUN" != 1 ]]; then
    "$PYTHON" - "$dir" <<'PY'
import json, sys
from collections import defaultdict
folder = sys.argv[1]
data = json.load(open(f"{folder}/captions_train.json"))
captions = defaultdict(list)
for annotation in data["annotations"]:
    captions[annotation["image_id"]].append(annotation["caption"])
with open(f"{folder}/corpus.jsonl", "w") as out:
    for image_id in sorted(captions):
        record = {"text": " ".join(captions[image_id]), "meta": {"redpajama_set_name": "RedPajamaC4"}}
        out.write(json.dumps(record) + "\n")
PY
  fi
}
