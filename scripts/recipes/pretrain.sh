#!/usr/bin/env bash
# The pretrain stage at real size: Phi-2 (2.7B, random init) on RedPajama cc + c4 (scripts/pretrain.py with
# recipes/real/pretrain.yaml; the smoke run uses recipes/smoke/pretrain.yaml). This script checks the paths and
# launches; the values and their reasons live in the recipe files.
#
#   bash scripts/recipes/pretrain.sh                      # one GPU (40 GB): block 2048, micro-batch 4
#   NUM_GPUS=8 bash scripts/recipes/pretrain.sh           # DDP on 8 GPUs (same per-GPU batch)
#   NUM_GPUS=8 ACCELERATE_CONFIG=scripts/configs/fsdp.yaml bash scripts/recipes/pretrain.sh --optim adamw_torch_fused
#   SMOKE=1 bash scripts/recipes/pretrain.sh              # tiny, CPU, offline, seconds
#   DRY_RUN=1 bash scripts/recipes/pretrain.sh            # check paths, print the command
#
# Data (RedPajama JSONL: {"text": ..., "meta": {"redpajama_set_name": ...}}, .jsonl/.jsonl.gz/.jsonl.zst):
#   REDPAJAMA_DIR (default data/redpajama) holding the c4 and cc files (e.g. RedPajama-Data-1T-Sample's
#   c4_sample.jsonl and cc_*_sample.jsonl), or TRAIN_FILES="a.jsonl b.jsonl" to name them.
# Other settings: TOKENIZER (default microsoft/phi-2: a hub id or a local folder), OUTPUT_DIR (outputs/pretrain);
#   MAX_STEPS, MICRO_BATCH, GRAD_ACCUM override the recipe's. Any further argument goes to scripts/pretrain.py.
# Global batch = NUM_GPUS x MICRO_BATCH x GRAD_ACCUM blocks of 2048 tokens (1 GPU: 16 x 2048 = 32K tokens/step).
source "$(dirname "$0")/_lib.sh"

if [[ "$SMOKE" == 1 ]]; then
  start_smoke "Phi-2 pretraining"
  [[ "$DRY_RUN" == 1 ]] || require_file "$SMOKE_ROOT/data/corpus.jsonl" "smoke corpus" OUTPUT_ROOT
  read -ra LAUNCH <<< "$(launcher)"
  run "${LAUNCH[@]}" scripts/pretrain.py --config recipes/smoke/pretrain.yaml \
    --train_files "$SMOKE_ROOT/data/corpus.jsonl" --data_cache_dir "$SMOKE_ROOT/cache" \
    --output_dir "${OUTPUT_DIR:-$SMOKE_ROOT/pretrain}" "${EXTRA_ARGS[@]}"
  exit 0
fi

describe "Phi-2 2.7B pretraining from scratch on RedPajama cc + c4"
REDPAJAMA_DIR=${REDPAJAMA_DIR:-data/redpajama}
if [[ -n "${TRAIN_FILES:-}" ]]; then
  read -ra FILES <<< "$TRAIN_FILES"
  for file in "${FILES[@]}"; do require_file "$file" "training file" TRAIN_FILES; done
else
  require_dir "$REDPAJAMA_DIR" "RedPajama folder" REDPAJAMA_DIR
  shopt -s nullglob
  FILES=("$REDPAJAMA_DIR"/c4*.jsonl* "$REDPAJAMA_DIR"/cc*.jsonl*)
  shopt -u nullglob
  [[ ${#FILES[@]} -gt 0 ]] || fail "no c4*.jsonl* or cc*.jsonl* files in $REDPAJAMA_DIR (set REDPAJAMA_DIR=... or TRAIN_FILES=...)"
fi
TOKENIZER=${TOKENIZER:-microsoft/phi-2}
require_model "$TOKENIZER" "tokenizer" TOKENIZER
echo "training files (${#FILES[@]}): ${FILES[*]}"

read -ra LAUNCH <<< "$(launcher)"
read -ra SIZE <<< "$(size_flags)"
run "${LAUNCH[@]}" scripts/pretrain.py --config recipes/real/pretrain.yaml \
  --tokenizer_name "$TOKENIZER" --train_files "${FILES[@]}" --output_dir "${OUTPUT_DIR:-outputs/pretrain}" \
  "${SIZE[@]}" "${EXTRA_ARGS[@]}"
