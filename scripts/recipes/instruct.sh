#!/usr/bin/env bash
# The instruct stage at real size: QLoRA instruction tuning on LLaVA-Instruct-150K (scripts/instruct.py with
# recipes/real/instruct.yaml, TRL SFTTrainer; the smoke run uses recipes/smoke/instruct.yaml): Phi-2 in 4-bit nf4,
# LoRA r=64 alpha=16 on q/k/v/dense/fc1/fc2, projector trained, tower frozen; merged at the end. This script checks
# the paths and launches; the values and their reasons live in the recipe files.
#
#   bash scripts/recipes/instruct.sh                      # one GPU: max_length 2048, micro-batch 4 x 4
#   NUM_GPUS=4 bash scripts/recipes/instruct.sh           # DDP on 4 GPUs (each holds the 4-bit model)
#   SMOKE=1 bash scripts/recipes/instruct.sh              # tiny, CPU, offline synthetic conversations
#   DRY_RUN=1 bash scripts/recipes/instruct.sh            # check paths, print the command
#
# Data: LLAVA_JSON (default data/llava/llava_instruct_150k.json) and its images, COCO train2017:
#   IMAGE_FOLDER (default $COCO_DIR/train2017, COCO_DIR default data/coco).
# Model: PROJECTOR_MODEL (default outputs/projector, the projector stage's output). Other settings: OUTPUT_DIR
#   (outputs/instruct); MICRO_BATCH, GRAD_ACCUM, MAX_LENGTH, EPOCHS override the recipe's. Any further argument goes
#   to scripts/instruct.py. Multi-GPU uses DDP: FSDP/ZeRO-3 would need the 4-bit weights stored in a shardable dtype.
source "$(dirname "$0")/_lib.sh"

if [[ "$SMOKE" == 1 ]]; then
  start_smoke "QLoRA instruction tuning"
  PROJECTOR_MODEL=${PROJECTOR_MODEL:-$SMOKE_ROOT/projector}
  # no projector smoke output yet: start from the tiny default
  [[ -f "$PROJECTOR_MODEL/config.json" ]] || use_tiny_model PROJECTOR_MODEL
  run_multimodal_smoke instruct "$PROJECTOR_MODEL" llava_instruct_train.json llava_instruct_val.json
fi

describe "QLoRA instruction tuning on LLaVA-Instruct-150K"
COCO_DIR=${COCO_DIR:-data/coco}
LLAVA_JSON=${LLAVA_JSON:-data/llava/llava_instruct_150k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-$COCO_DIR/train2017}
PROJECTOR_MODEL=${PROJECTOR_MODEL:-outputs/projector}
require_file "$LLAVA_JSON" "LLaVA-Instruct-150K conversations" LLAVA_JSON
require_dir "$IMAGE_FOLDER" "LLaVA-Instruct images (COCO train2017)" IMAGE_FOLDER
require_file "$PROJECTOR_MODEL/config.json" "projector model (run scripts/recipes/projector.sh first)" PROJECTOR_MODEL

read -ra LAUNCH <<< "$(launcher)"
read -ra SIZE <<< "$(size_flags)"
run "${LAUNCH[@]}" scripts/instruct.py --config recipes/real/instruct.yaml --model_name_or_path "$PROJECTOR_MODEL" \
  --data_path "$LLAVA_JSON" --image_folder "$IMAGE_FOLDER" --output_dir "${OUTPUT_DIR:-outputs/instruct}" \
  "${SIZE[@]}" "${EXTRA_ARGS[@]}"
