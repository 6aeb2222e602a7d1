#!/usr/bin/env bash
# GPU check: the three stages at real size with random weights, one training step loop each through the stage's
# Trainer and through a bare PyTorch loop (benchmarks/benchmark.py): Phi-2 2.7B pretraining (block 2048, micro-batch 4,
# paged_adamw_8bit, bf16, gradient checkpointing), stage 1 (TinyCLIP-size tower + Phi-2, projector from cached
# features, batch 32 x 128) and stage 2 QLoRA (4-bit Phi-2 + LoRA r=64, max_length 2048, micro-batch 4). Memory,
# throughput and MFU go to $OUT as JSON, with the goal verdicts and a Markdown table for BENCHMARKS.md.
# Made for ONE call on a machine with an H100 and no internet; about 3-5 minutes (every stage is capped).
#
#   bash benchmarks/gpu_check.sh           # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --tiny    # tiny sizes on the CPU: runs the same path end to end here (~1-2 min)
#
# Packages the GPU image lacks (or has in other versions) travel as wheels in .whl/ (build them here with
# benchmarks/gpu_wheelhouse.sh, carry ".whl"); they are installed into /tmp/site first. Files written to $OUT
# (default outputs/gpu_check; STAGES="pretrain instruct" runs a subset): environment.txt, pretrain.json, projector.json, instruct.json, goals.json,
# gpu_check.md, gpu_check.log.
set -uo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
TINY=0
for arg in "$@"; do
  case "$arg" in
    --tiny | --dry | --dry-run) TINY=1 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --tiny for the CPU dry run)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$REPO_ROOT/outputs/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=warning

if [[ "$TINY" == 1 ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
  DEVICE_ARGS=(--device cpu --size tiny --warmup 1 --steps 2)
  LIMITS=(240 240 240)
else
  PYTHON=${PYTHON:-python3}
  if compgen -G ".whl/*.whl" > /dev/null; then
    echo "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || { echo "gpu_check.sh: installing the wheels failed" >&2; exit 3; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}  # the mmphi package, not pip-installed on a bare GPU box
  DEVICE_ARGS=(--device cuda --size real --warmup 3 --steps 8)
  # seconds for pretrain (stage 0's build_trainer initialises Phi-2 2.7B on the CPU), projector (builds + saves the
  # random 2.8B MM-Phi, caches the tower features), instruct: < 9 min in all
  LIMITS=(180 160 180)
fi
STAGES=${STAGES:-pretrain projector instruct}

{
  date -u
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  "$PYTHON" - <<'PY'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.machine())
for name in ("torch", "transformers", "accelerate", "peft", "trl", "bitsandbytes", "datasets", "tokenizers",
             "safetensors", "huggingface_hub", "pyarrow", "fsspec"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} {getattr(module, '__file__', '')}")
    except Exception as error:  # report and go on: the stage that needs it will say more
        print(f"{name} MISSING: {type(error).__name__}: {error}")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# One process per stage: bitsandbytes' paged optimizer states (CUDA managed memory) are not returned while the
# process lives, so a stage in the same process would see the previous stage's memory. The random MM-Phi folder
# is built once (by the projector stage) and shared.
MODEL_DIR=$(mktemp -d /tmp/mmphi-random-XXXX)
status=0
for stage in $STAGES; do
  case "$stage" in pretrain) limit=${LIMITS[0]} ;; projector) limit=${LIMITS[1]} ;; instruct) limit=${LIMITS[2]} ;;
    *) echo "gpu_check.sh: unknown stage $stage" >&2; exit 2 ;; esac
  echo "== $stage (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$PYTHON" benchmarks/benchmark.py "${DEVICE_ARGS[@]}" --stages "$stage" \
    --keep_going --model_dir "$MODEL_DIR" --json "$OUT/$stage.json" --markdown "$OUT/gpu_check.md" \
    >> "$OUT/gpu_check.log" 2>&1
  code=$?
  [[ $code == 0 ]] || { echo "$stage: exit $code (see gpu_check.log)"; status=1; }
  tail -n 12 "$OUT/gpu_check.log" | grep -E "^\| $stage|FAILED" || true
done
rm -rf "$MODEL_DIR"

reports=()
for stage in pretrain projector instruct; do [[ -f "$OUT/$stage.json" ]] && reports+=("$OUT/$stage.json"); done
if [[ ${#reports[@]} -gt 0 ]]; then
  "$PYTHON" benchmarks/benchmark.py --goals "${reports[@]}" --json "$OUT/goals.json" > /dev/null 2>> "$OUT/gpu_check.log" \
    || status=1
fi
echo "== results ($OUT)"
[[ -f "$OUT/gpu_check.md" ]] && cat "$OUT/gpu_check.md"
[[ -f "$OUT/goals.json" ]] && "$PYTHON" -c "
import json, sys
goals = json.load(open(sys.argv[1]))
for stage in ('pretrain', 'instruct'):
    if stage in goals:
        print(stage, {k: v for k, v in goals[stage].items() if k not in ('goal', 'measured')})
" "$OUT/goals.json"
exit $status
