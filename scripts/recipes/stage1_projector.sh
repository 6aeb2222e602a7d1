#!/usr/bin/env bash
# Stage 1: train the projector (TinyCLIP -> Phi-2) on COCO 2017 captions; tower and language model frozen
# (scripts/train_projector.py). Builds the MM-Phi base folder first when it is missing (scripts/build_model.py).
#
#   bash scripts/recipes/stage1_projector.sh                     # one GPU: cached tower features, batch 32 x 4
#   NUM_GPUS=4 bash scripts/recipes/stage1_projector.sh          # DDP on 4 GPUs
#   SMOKE=1 bash scripts/recipes/stage1_projector.sh             # tiny, CPU, offline synthetic captions, seconds
#   DRY_RUN=1 bash scripts/recipes/stage1_projector.sh           # check paths, print the commands
#
# Data: COCO_DIR (default data/coco) with annotations/captions_train2017.json, annotations/captions_val2017.json,
#   train2017/ and val2017/.
# Models: BASE_MODEL (default outputs/mmphi-base; built from VISION_MODEL + TEXT_MODEL when missing),
#   VISION_MODEL (default wkcn/TinyCLIP-ViT-61M-32-Text-29M-LAION400M), TEXT_MODEL (default microsoft/phi-2; or
#   outputs/stage0 for our own stage 0). Other settings: OUTPUT_DIR (outputs/stage1), MICRO_BATCH (32),
#   GRAD_ACCUM (4), EPOCHS (1). Any further argument goes to train_projector.py.
source "$(dirname "$0")/_lib.sh"

if [[ "$SMOKE" == 1 ]]; then
  describe "projector pretraining"
  SMOKE_ROOT=${OUTPUT_ROOT:-outputs/smoke}
  make_smoke_data "$SMOKE_ROOT/data"
  [[ -n "${BASE_MODEL:-}" ]] || use_tiny_model BASE_MODEL
  read -ra LAUNCH <<< "$(launcher)"
  # shellcheck disable=SC2046
  run "${LAUNCH[@]}" scripts/train_projector.py --model_name_or_path "$BASE_MODEL" \
    $(smoke_data_flags captions_train.json captions_val.json) --cache_vision_features \
    --output_dir "${OUTPUT_DIR:-$SMOKE_ROOT/stage1}" --learning_rate 2e-3 $(smoke_flags) "${EXTRA_ARGS[@]}"
  exit 0
fi

describe "projector pretraining (TinyCLIP + Phi-2) on COCO 2017 captions"
COCO_DIR=${COCO_DIR:-data/coco}
require_file "$COCO_DIR/annotations/captions_train2017.json" "COCO training captions" COCO_DIR
require_file "$COCO_DIR/annotations/captions_val2017.json" "COCO validation captions" COCO_DIR
require_dir "$COCO_DIR/train2017" "COCO training images" COCO_DIR
require_dir "$COCO_DIR/val2017" "COCO validation images" COCO_DIR

BASE_MODEL=${BASE_MODEL:-outputs/mmphi-base}
if [[ ! -f "$BASE_MODEL/config.json" ]]; then
  VISION_MODEL=${VISION_MODEL:-wkcn/TinyCLIP-ViT-61M-32-Text-29M-LAION400M}
  TEXT_MODEL=${TEXT_MODEL:-microsoft/phi-2}
  require_model "$VISION_MODEL" "vision model" VISION_MODEL
  require_model "$TEXT_MODEL" "language model" TEXT_MODEL
  echo "no MM-Phi base folder at $BASE_MODEL: building it from $VISION_MODEL + $TEXT_MODEL"
  run "$PYTHON" scripts/build_model.py --vision_model "$VISION_MODEL" --text_model "$TEXT_MODEL" \
    --output_dir "$BASE_MODEL"
fi

read -ra LAUNCH <<< "$(launcher)"
run "${LAUNCH[@]}" scripts/train_projector.py \
  --model_name_or_path "$BASE_MODEL" \
  --data_path "$COCO_DIR/annotations/captions_train2017.json" --image_folder "$COCO_DIR/train2017" \
  --eval_data_path "$COCO_DIR/annotations/captions_val2017.json" --eval_image_folder "$COCO_DIR/val2017" \
  --cache_vision_features --output_dir "${OUTPUT_DIR:-outputs/stage1}" \
  --per_device_train_batch_size "${MICRO_BATCH:-32}" --gradient_accumulation_steps "${GRAD_ACCUM:-4}" \
  --num_train_epochs "${EPOCHS:-1}" --learning_rate 1e-3 --warmup_steps 0.03 --max_length 128 \
  --train_sampling_strategy group_by_length --optim paged_adamw_8bit \
  --eval_strategy steps --eval_steps 500 --save_steps 1000 --save_total_limit 2 --max_eval_samples 2000 \
  --logging_steps 10 --report_to tensorboard --dataloader_num_workers 4 \
  "${EXTRA_ARGS[@]}"
