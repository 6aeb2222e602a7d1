#!/usr/bin/env bash
# Stage 0: pretrain Phi-2 (2.7B, random init) on RedPajama cc + c4 with HF Trainer (scripts/pretrain_phi2.py).
#
#   bash scripts/recipes/stage0_pretrain.sh                      # one GPU (40 GB): block 2048, micro-batch 4
#   NUM_GPUS=8 bash scripts/recipes/stage0_pretrain.sh           # DDP on 8 GPUs (same per-GPU batch)
#   NUM_GPUS=8 ACCELERATE_CONFIG=scripts/configs/fsdp.yaml bash scripts/recipes/stage0_pretrain.sh --optim adamw_torch_fused
#   SMOKE=1 bash scripts/recipes/stage0_pretrain.sh              # tiny, CPU, offline, seconds
#   DRY_RUN=1 bash scripts/recipes/stage0_pretrain.sh            # check paths, print the command
#
# Data (RedPajama JSONL: {"text": ..., "meta": {"redpajama_set_name": ...}}, .jsonl/.jsonl.gz/.jsonl.zst):
#   REDPAJAMA_DIR (default data/redpajama) holding the c4 and cc files (e.g. RedPajama-Data-1T-Sample's
#   c4_sample.jsonl and cc_*_sample.jsonl), or TRAIN_FILES="a.jsonl b.jsonl" to name them.
# Other settings: TOKENIZER (default microsoft/phi-2: a hub id or a local folder), OUTPUT_DIR (outputs/stage0),
#   MAX_STEPS (4000, the seed's), MICRO_BATCH (4), GRAD_ACCUM (4). Any further argument goes to pretrain_phi2.py.
# Global batch = NUM_GPUS x MICRO_BATCH x GRAD_ACCUM blocks of 2048 tokens (1 GPU: 16 x 2048 = 32K tokens/step).
source "$(dirname "$0")/_lib.sh"

if [[ "$SMOKE" == 1 ]]; then
  describe "Phi-2 pretraining"
  SMOKE_ROOT=${OUTPUT_ROOT:-outputs/smoke}
  make_smoke_data "$SMOKE_ROOT/data"
  [[ "$DRY_RUN" == 1 ]] || require_file "$SMOKE_ROOT/data/corpus.jsonl" "smoke corpus" OUTPUT_ROOT
  read -ra LAUNCH <<< "$(launcher)"
  # shellcheck disable=SC2046
  run "${LAUNCH[@]}" scripts/pretrain_phi2.py \
    --config_name tiny --config_overrides hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=4 \
    --train_files "$SMOKE_ROOT/data/corpus.jsonl" --data_cache_dir "$SMOKE_ROOT/cache" \
    --output_dir "${OUTPUT_DIR:-$SMOKE_ROOT/stage0}" --block_size 64 --learning_rate 3e-3 --max_eval_blocks 8 \
    --validation_split_percentage 10 $(smoke_flags) "${EXTRA_ARGS[@]}"
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
run "${LAUNCH[@]}" scripts/pretrain_phi2.py \
  --config_name phi-2 --tokenizer_name "$TOKENIZER" --train_files "${FILES[@]}" \
  --output_dir "${OUTPUT_DIR:-outputs/stage0}" \
  --block_size 2048 --per_device_train_batch_size "${MICRO_BATCH:-4}" --gradient_accumulation_steps "${GRAD_ACCUM:-4}" \
  --max_steps "${MAX_STEPS:-4000}" --learning_rate 3e-4 --warmup_steps 200 --weight_decay 0.1 \
  --optim paged_adamw_8bit --gradient_checkpointing true \
  --eval_steps 500 --save_steps 500 --save_total_limit 3 --max_eval_blocks 512 \
  --logging_steps 10 --report_to tensorboard --preprocessing_num_workers 8 --dataloader_num_workers 2 \
  "${EXTRA_ARGS[@]}"
