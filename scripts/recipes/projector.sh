#!/usr/bin/env bash
# The projector stage at real size: the projector (TinyCLIP -> Phi-2) on COCO 2017 captions, tower and language
# model frozen (scripts/projector.py with recipes/real/projector.yaml; the smoke run uses recipes/smoke/projector.yaml).
# Builds the MM-Phi base folder first when it is missing (scripts/build_model.py). This script checks the paths and
# launches; the values and their reasons live in the recipe files.
#
#   bash scripts/recipes/projector.sh                     # one GPU: cached tower features, batch 32 x 4
#   NUM_GPUS=4 bash scripts/recipes/projector.sh          # DDP on 4 GPUs
#   SMOKE=1 bash scripts/recipes/projector.sh             # tiny, CPU, offline synthetic captions, seconds
#   DRY_RUN=1 bash scripts/recipes/projector.sh           # check paths, print the commands
#
# Data: COCO_DIR (default data/coco) with annotations/captions_train2017.json, annotations/captions_val2017.json,
#   train2017/ and val2017/.
# Models: BASE_MODEL (default outputs/mmphi-base; built from VISION_MODEL + TEXT_MODEL when missing),
#   VISION_MODEL (default wkcn/TinyCLIP-ViT-61M-32-Text-29M-LAION400M), TEXT_MODEL (default microsoft/phi-2; or
#   outputs/pretrain for our own pretrained Phi). Other settings: OUTPUT_DIR (outputs/projector); MICRO_BATCH,
#   GRAD_ACCUM, EPOCHS override the recipe's. Any further argument goes to scripts/projector.py.
source "$(dirname "$0")/_lib.sh"

if [[ "$SMOKE" == 1 ]]; then
  start_smoke "projector pretraining"
  [[ -n "${BASE_MODEL:-}" ]] || use_tiny_model BASE_MODEL
  run_multimodal_smoke projector "$BASE_MODEL" captions_train.json captions_val.json
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
read -ra SIZE <<< "$(size_flags)"
run "${LAUNCH[@]}" scripts/projector.py --config recipes/real/projector.yaml --model_name_or_path "$BASE_MODEL" \
  --data_path "$COCO_DIR/annotations/captions_train2017.json" --image_folder "$COCO_DIR/train2017" \
  --eval_data_path "$COCO_DIR/annotations/captions_val2017.json" --eval_image_folder "$COCO_DIR/val2017" \
  --output_dir "${OUTPUT_DIR:-outputs/projector}" "${SIZE[@]}" "${EXTRA_ARGS[@]}"
