#!/usr/bin/env bash
# GPU check: the three stages at real size with random weights, one training step loop each through the stage's
# Trainer and through a bare PyTorch loop (python -m benchmarks.benchmark): Phi-2 2.7B pretraining (block 2048,
# micro-batch 4, paged_adamw_8bit, bf16, gradient checkpointing), projector (TinyCLIP-size tower + Phi-2, projector
# from cached features, batch 32 x 128) and instruct QLoRA (4-bit Phi-2 + LoRA r=64, max_length 2048, micro-batch 4).
# Memory, throughput and MFU go to $OUT as JSON, with the goal verdicts and a Markdown table for BENCHMARKS.md.
# Made for ONE call on a machine with an H100 and no internet; about 3-5 minutes (every stage is capped).
#
#   bash benchmarks/gpu_check.sh           # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --tiny    # tiny sizes on the CPU: runs the same path end to end here (~1-2 min)
#   bash benchmarks/gpu_check.sh --variants          # only pretrain's speed-option A/B, one table
#   bash benchmarks/gpu_check.sh --zero              # only the DeepSpeed ZeRO-2/3 end-to-end checks
#   STAGES="" VARIANTS="liger compile" bash benchmarks/gpu_check.sh   # choose what runs
#
# Speed options A/B: after the stages, pretrain runs once per variant in VARIANTS (default: baseline liger
# compile no_ckpt flash_attn) with the same data and seed, each through its standard flag; the table in
# $OUT/variants.md gives step time, tokens/s, MFU, peak memory and the training loss (a speed option must not change
# it beyond float noise). flash_attn is skipped with a note when flash-attn is not installed.
#
# DeepSpeed ZeRO end to end (ZERO, default "zero2 zero3"; needs deepspeed: benchmarks/gpu_wheelhouse.sh --deepspeed):
# the projector stage on the tiny random MM-Phi and synthetic data (recipes/smoke/projector.yaml, bf16) through
# `accelerate launch --config_file scripts/configs/deepspeed_<zero>.yaml`, one process per GPU (with one GPU the
# ZeRO-3 partitions span a world of one, yet the engine, the 16-bit gather and the final save all run); then the final
# folder must load with AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) (no empty tensor) and
# carry a trained projector (python -m benchmarks.zero). Pass/fail and times go to $OUT/zero.json and a table in
# gpu_check.md. ZERO_ARGS (default --cache_vision_features false) are added to each launch: under ZeRO-3
# (zero3_init_flag) the model loads partitioned, so the feature cache refuses to run the tower; ZERO_ARGS="" checks
# that refusal. Skipped with a note under --tiny and without deepspeed.
#
# Packages the GPU image lacks (or has in other versions) travel as wheels in .whl/ (build them here with
# benchmarks/gpu_wheelhouse.sh, carry ".whl"); they are installed into /tmp/site first. Files written to $OUT
# (default outputs/gpu_check; STAGES="pretrain instruct" runs a subset): environment.txt, pretrain.json,
# projector.json, instruct.json, goals.json, zero.json, gpu_check.md, gpu_check.log.
set -uo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
TINY=0
ONLY_VARIANTS=0
ONLY_ZERO=0
for arg in "$@"; do
  case "$arg" in
    --tiny | --dry | --dry-run) TINY=1 ;;
    --variants) ONLY_VARIANTS=1 ;;
    --zero) ONLY_ZERO=1 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --tiny for the CPU dry run, --variants for the A/B, --zero for" \
         "the ZeRO checks)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$REPO_ROOT/outputs/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=warning

if [[ "$TINY" == 1 ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
  DEVICE_ARGS=(--device cpu --size tiny --warmup 1 --steps 2)
  LIMITS=(240 240 240)
  VARIANT_LIMIT=240
  ZERO_LIMIT=240
else
  PYTHON=${PYTHON:-python3}
  if compgen -G ".whl/*.whl" > /dev/null; then
    echo "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || { echo "gpu_check.sh: installing the wheels failed" >&2; exit 3; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}  # mmphi (not pip-installed on a bare GPU box) and benchmarks
  DEVICE_ARGS=(--device cuda --size real --warmup 3 --steps 8)
  # seconds for pretrain (its build_trainer initialises Phi-2 2.7B on the CPU), projector (builds + saves the
  # random 2.8B MM-Phi, caches the tower features), instruct: < 9 min in all
  LIMITS=(180 160 180)
  VARIANT_LIMIT=110  # each pretrain variant: build Phi-2 2.7B, 3 + 8 steps
  ZERO_LIMIT=150     # each ZeRO launch: import deepspeed, tiny MM-Phi, 2 steps, evaluate, save
fi
if [[ "$ONLY_VARIANTS" == 1 || "$ONLY_ZERO" == 1 ]]; then STAGES=${STAGES-}; else STAGES=${STAGES-pretrain projector instruct}; fi
if [[ "$ONLY_ZERO" == 1 ]]; then VARIANTS=${VARIANTS-}; else VARIANTS=${VARIANTS-baseline liger compile no_ckpt flash_attn}; fi
if [[ "$ONLY_VARIANTS" == 1 ]]; then ZERO=${ZERO-}; else ZERO=${ZERO-zero2 zero3}; fi
ZERO_ARGS=${ZERO_ARGS---cache_vision_features false}
variant_flags() {
  case "$1" in
    baseline) echo "" ;;
    liger) echo "--use_liger_kernel true" ;;
    compile) echo "--torch_compile true" ;;
    no_ckpt) echo "--gradient_checkpointing false" ;;
    flash_attn) echo "--attn_implementation flash_attention_2" ;;
    *) return 1 ;;
  esac
}

{
  date -u
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  "$PYTHON" - <<'PY'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.machine())
for name in ("torch", "transformers", "accelerate", "peft", "trl", "bitsandbytes", "datasets", "tokenizers",
             "safetensors", "huggingface_hub", "pyarrow", "fsspec", "deepspeed"):
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
  timeout --kill-after=10 "$limit" "$PYTHON" -m benchmarks.benchmark "${DEVICE_ARGS[@]}" --stages "$stage" \
    --keep_going --model_dir "$MODEL_DIR" --json "$OUT/$stage.json" --markdown "$OUT/gpu_check.md" \
    >> "$OUT/gpu_check.log" 2>&1
  code=$?
  [[ $code == 0 ]] || { echo "$stage: exit $code (see gpu_check.log)"; status=1; }
  tail -n 12 "$OUT/gpu_check.log" | grep -E "^\| $stage|FAILED" || true
done
rm -rf "$MODEL_DIR"

variant_reports=()
for variant in $VARIANTS; do
  flags=$(variant_flags "$variant") || { echo "gpu_check.sh: unknown variant $variant" >&2; exit 2; }
  if [[ "$variant" == flash_attn ]] && ! "$PYTHON" -c "import flash_attn" 2> /dev/null; then
    echo "== variant flash_attn: skipped (flash-attn is not installed)"; continue
  fi
  echo "== variant $variant ($flags; limit ${VARIANT_LIMIT} s)"
  timeout --kill-after=10 "$VARIANT_LIMIT" "$PYTHON" -m benchmarks.benchmark "${DEVICE_ARGS[@]}" --stages pretrain \
    --keep_going --no_markdown --variant "$variant" --variant_flags "$flags" --json "$OUT/pretrain-$variant.json" \
    >> "$OUT/gpu_check.log" 2>&1 || { echo "variant $variant: failed (see gpu_check.log)"; status=1; }
  [[ -f "$OUT/pretrain-$variant.json" ]] && variant_reports+=("$OUT/pretrain-$variant.json")
done
if [[ ${#variant_reports[@]} -gt 0 ]]; then
  "$PYTHON" -m benchmarks.report --variants "${variant_reports[@]}" > "$OUT/variants.md" 2>> "$OUT/gpu_check.log" \
    || status=1
  cat "$OUT/variants.md"
fi

# DeepSpeed ZeRO end to end (header): train + save through accelerate launch, then load the final folder in a fresh
# process. One JSON row per config in $ZERO_DIR/rows.jsonl, gathered into $OUT/zero.json and a gpu_check.md table.
if [[ -n "$ZERO" && "$TINY" == 1 ]]; then
  echo "== DeepSpeed ZeRO ($ZERO): skipped under --tiny (a GPU check; tests/test_benchmark.py runs --tiny)"
elif [[ -n "$ZERO" ]] && ! "$PYTHON" -c "import deepspeed" > /dev/null 2>&1; then
  echo "== DeepSpeed ZeRO ($ZERO): skipped (deepspeed does not import: build .whl with gpu_wheelhouse.sh --deepspeed)"
  "$PYTHON" -c "import json, sys; json.dump({'skipped': 'deepspeed does not import', 'configs': sys.argv[2:]},
open(sys.argv[1], 'w'), indent=1)" "$OUT/zero.json" $ZERO
elif [[ -n "$ZERO" ]]; then
  ZERO_DIR=$(mktemp -d /tmp/mmphi-zero-XXXX)
  NPROC=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
  echo "== DeepSpeed ZeRO ($ZERO; projector, tiny MM-Phi, $NPROC process(es), $ZERO_ARGS; limit ${ZERO_LIMIT} s each)"
  if ! { "$PYTHON" scripts/make_synthetic_data.py --output_dir "$ZERO_DIR/data" --num_images 40 &&
         "$PYTHON" scripts/build_model.py --preset tiny --output_dir "$ZERO_DIR/mmphi-tiny"; } \
       >> "$OUT/gpu_check.log" 2>&1; then
    echo "zero: building the tiny MM-Phi or its data failed (see gpu_check.log)"; status=1; ZERO=""
  fi
  for zero in $ZERO; do
    [[ -f "scripts/configs/deepspeed_$zero.yaml" ]] || { echo "gpu_check.sh: unknown ZeRO config $zero" >&2; exit 2; }
    run_dir=$ZERO_DIR/$zero
    start=$(date +%s.%N)
    # shellcheck disable=SC2086  # ZERO_ARGS: flags, split on purpose
    timeout --kill-after=10 "$ZERO_LIMIT" "$PYTHON" -m accelerate.commands.launch \
      --config_file "scripts/configs/deepspeed_$zero.yaml" --num_processes "$NPROC" scripts/projector.py \
      --config recipes/smoke/projector.yaml --use_cpu false --bf16 true --report_to none \
      --model_name_or_path "$ZERO_DIR/mmphi-tiny" --data_path "$ZERO_DIR/data/captions_train.json" \
      --image_folder "$ZERO_DIR/data/images" --feature_cache_dir "$run_dir-features" --output_dir "$run_dir" \
      $ZERO_ARGS > "$run_dir.log" 2>&1
    code=$?
    seconds=$("$PYTHON" -c "import sys, time; print(round(time.time() - float(sys.argv[1]), 1))" "$start")
    cat "$run_dir.log" >> "$OUT/gpu_check.log"
    "$PYTHON" -m benchmarks.zero check --config "$zero" --exit_code "$code" --seconds "$seconds" \
      --processes "$NPROC" --folder "$run_dir" --initial "$ZERO_DIR/mmphi-tiny" --rows "$ZERO_DIR/rows.jsonl" \
      >> "$OUT/gpu_check.log" 2>&1
    if tail -n 1 "$ZERO_DIR/rows.jsonl" 2> /dev/null | grep -q "\"config\": \"$zero\".*\"result\": \"pass\""; then
      echo "$zero: pass (launch exit $code, ${seconds} s)"
    else
      echo "$zero: FAILED (launch exit $code, ${seconds} s; see zero.json, gpu_check.log)"; status=1
    fi
  done
  if [[ -f "$ZERO_DIR/rows.jsonl" ]]; then
    "$PYTHON" -m benchmarks.zero report --rows "$ZERO_DIR/rows.jsonl" --json "$OUT/zero.json" \
      --markdown "$OUT/gpu_check.md" --extra="$ZERO_ARGS" 2>> "$OUT/gpu_check.log" || status=1
  fi
  rm -rf "$ZERO_DIR"
fi

reports=()
for stage in pretrain projector instruct; do [[ -f "$OUT/$stage.json" ]] && reports+=("$OUT/$stage.json"); done
if [[ ${#reports[@]} -gt 0 ]]; then
  "$PYTHON" -m benchmarks.benchmark --goals "${reports[@]}" --json "$OUT/goals.json" > /dev/null 2>> "$OUT/gpu_check.log" \
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
