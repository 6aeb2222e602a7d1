#!/usr/bin/env bash
# Stage 2: QLoRA instruction tuning on LLaVA-Instruct-150K (scripts/finetune_instruct.py, TRL SFTTrainer): Phi-2 in
# 4-bit nf4, LoRA r=64 alpha=16 on q/k/v/dense/fc1/fc2, projector trained, tower frozen; merged at the end.
#
#   bash scripts/recipes/stage2_instruct.sh                      # one GPU: max_length 2048, micro-batch 4 x 4
#   NUM_GPUS=4 bash scripts/recipes/stage2_instruct.sh           # DDP on 4 GPUs (each holds the 4-bit model)
#   SMOKE=1 bash scripts/recipes/stage2_instruct.sh              # tiny, CPU, offline synthetic conversations
#   DRY_RUN=1 bash scripts/recipes/stage2_instruct.sh            # check paths, print the command
#
# Data: LLAVA_JSON (default data/llava/llava_instruct_150k.json) and its images, COCO train2017:
#   IMAGE_FOLDER (default $COCO_DIR/train2017, COCO_DIR default data/coco).
# Model: STAGE1_MODEL (default outputs/stage1, the stage-1 output). Other settings: OUTPUT_DIR (outputs/stage2),
#   MICRO_BATCH (4), GRAD_ACCUM (4), MAX_LENGTH (2048), EPOCHS (1). Any further argument goes to
#   finetune_instruct.py. Multi-GPU uses DDP: FSDP/ZeRO-3 would need the 4-bit weights stored in a shardable dtype.
source "$(dirname "$0")/_lib.sh"

if [[ "$SMOKE" == 1 ]]; then
  describe "QLoRA instruction tuning"
  SMOKE_ROOT=${OUTPUT_ROOT:-outputs/smoke}
  make_smoke_data "$SMOKE_ROOT/data"
  STAGE1_MODEL=${STAGE1_MODEL:-$SMOKE_ROOT/stage1}
  # no stage-1 smoke output yet: start from the tiny default
  [[ -f "$STAGE1_MODEL/config.json" ]] || use_tiny_model STAGE1_MODEL
  read -ra LAUNCH <<< "$(launcher)"
  # shellcheck disable=SC2046
  run "${LAUNCH[@]}" scripts/finetune_instruct.py --model_name_or_path "$STAGE1_MODEL" \
    $(smoke_data_flags llava_instruct_train.json llava_instruct_val.json) \
    --output_dir "${OUTPUT_DIR:-$SMOKE_ROOT/stage2}" --max_length 256 --lora_r 8 --learning_rate 1e-3 \
    --merge $(smoke_flags) "${EXTRA_ARGS[@]}"
  exit 0
fi

describe "QLoRA instruction tuning on LLaVA-Instruct-150K"
COCO_DIR=${COCO_DIR:-data/coco}
LLAVA_JSON=${LLAVA_JSON:-data/llava/llava_instruct_150k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-$COCO_DIR/train2017}
STAGE1_MODEL=${STAGE1_MODEL:-outputs/stage1}
require_file "$LLAVA_JSON" "LLaVA-Instruct-150K conversations" LLAVA_JSON
require_dir "$IMAGE_FOLDER" "LLaVA-Instruct images (COCO train2017)" IMAGE_FOLDER
require_file "$STAGE1_MODEL/config.json" "stage-1 model (run scripts/recipes/stage1_projector.sh first)" STAGE1_MODEL

read -ra LAUNCH <<< "$(launcher)"
run "${LAUNCH[@]}" scripts/finetune_instruct.py \
  --model_name_or_path "$STAGE1_MODEL" --data_path "$LLAVA_JSON" --image_folder "$IMAGE_FOLDER" \
  --output_dir "${OUTPUT_DIR:-outputs/stage2}" --quantization 4bit --lora_r 64 --lora_alpha 16 \
  --max_length "${MAX_LENGTH:-2048}" --per_device_train_batch_size "${MICRO_BATCH:-4}" \
  --gradient_accumulation_steps "${GRAD_ACCUM:-4}" --num_train_epochs "${EPOCHS:-1}" \
  --learning_rate 2e-4 --warmup_steps 0.03 --optim paged_adamw_8bit --gradient_checkpointing true \
  --val_fraction 0.01 --eval_strategy steps --eval_steps 1000 --save_steps 1000 --save_total_limit 2 \
  --logging_steps 10 --report_to tensorboard --dataloader_num_workers 4 --merge \
  "${EXTRA_ARGS[@]}"
