"""The projector stage: pretrain the projector on image captions (COCO 2017 format) with HF Trainer.

The vision tower and the language model are frozen (`requires_grad_(False)`; the optimizer sees only the projector).
Each caption is one teacher-forced sample: a fixed captioning prompt with the image as the user turn, the caption as
the assistant turn; the loss is on the caption tokens and the EOS that ends them (one forward per batch).
Validation is split by image (`--val_fraction`, or a separate `--eval_data_path`). Every `TrainingArguments` flag
works (`--resume_from_checkpoint`, `--report_to tensorboard`, `accelerate launch`).

    # the real recipe (GPU): TinyCLIP + Phi-2 from scripts/build_model.py, COCO 2017 captions
    python scripts/projector.py --config recipes/real/projector.yaml --model_name_or_path outputs/mmphi-base \
        --data_path coco/annotations/captions_train2017.json --image_folder coco/train2017 \
        --eval_data_path coco/annotations/captions_val2017.json --eval_image_folder coco/val2017 \
        --output_dir outputs/projector

    # the offline tiny pipeline (2-core CPU, a few minutes; scripts/demo.py runs it), see BENCHMARKS.md
    # "Projector (tiny)"
    python scripts/projector.py --config recipes/tiny/projector.yaml --model_name_or_path outputs/mmphi-tiny \
        --data_path data/synthetic/captions_train.json --image_folder data/synthetic/images \
        --output_dir outputs/projector-tiny

`--cache_vision_features` runs the frozen tower once over every image (on the training device, batched, images decoded
in `--dataloader_num_workers` workers; under DDP each process computes its share of the shards), stores its features
as memory-mapped safetensors outside output_dir (`--feature_cache_dir`, reused while the tower and images are
unchanged) and trains from them. `--train_language_model` is for
the tiny pipeline only: its Phi had a few minutes of pretraining, too weak for projected image tokens to steer while
frozen; the real recipe keeps Phi-2 frozen. `--train_vision_tower` is for a random tower (`build_model.py
--vision_model tiny`); it learns slowly through the caption loss, so the offline pipeline instead pretrains a tiny
CLIP contrastively (`scripts/clip.py`) and, like the real recipe with TinyCLIP, keeps it frozen here.
`--validate_data` scans the data files (records and every image) and exits.
The output folder is a complete MM-Phi checkpoint (loads with AutoModelForCausalLM, trust_remote_code=True).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import Trainer, set_seed

from mmphi.data import CAPTION_PROMPT, build_datasets, load_train_eval, padding_fraction, validate_data
from mmphi.loading import training_dtype
from mmphi.stages.arguments import EXPORT_LLAVA_HELP, MultimodalDataArguments
from mmphi.training import (
    BuiltStage,
    MMPhiTrainerMixin,
    Stage,
    StageTrainingArguments,
    apply_speed_options,
    encoded_data_metrics,
)
from modeling_mmphi import MMPhiForCausalLM
from processing_mmphi import MMPhiProcessor

logger = logging.getLogger(__name__)

@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "an MM-Phi folder (scripts/build_model.py)"})
    train_vision_tower: bool = field(
        default=False,
        metadata={"help": "also train the vision tower: ONLY for a random tower (build_model.py --vision_model "
                          "tiny); the real recipe keeps TinyCLIP frozen, the offline one its scripts/clip.py CLIP"},
    )
    train_language_model: bool = field(
        default=False,
        metadata={"help": "also train the language model: ONLY for the tiny pipeline, whose few-minute pretrained "
                          "Phi is too weak for image tokens to steer while frozen; the real recipe keeps Phi-2 frozen"},
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa, flash_attention_2, ..."})
    export_llava: str | None = field(default=None, metadata={"help": EXPORT_LLAVA_HELP})


@dataclass
class DataArguments(MultimodalDataArguments):
    """Any registered format: COCO captions (annotations/captions_train2017.json) or LLaVA-Pretrain-558K."""

    max_eval_samples: int | None = field(default=2000, metadata={"help": "evaluate on at most this many captions"})
    max_train_images: int | None = field(default=None, metadata={"help": "use at most this many training images"})
    max_length: int = field(default=128, metadata={"help": "tokens per sample (image tokens included)"})
    caption_prompt: str = field(default=CAPTION_PROMPT, metadata={"help": "the user turn of COCO caption samples"})


@dataclass
class ProjectorTrainingArguments(StageTrainingArguments):
    """Stage defaults, with what projector pretraining wants: a high learning rate (LLaVA uses 1e-3), no weight
    decay, and the image tensors kept in the batches."""

    output_dir: str = field(default="outputs/projector")
    learning_rate: float = field(default=1e-3)
    weight_decay: float = field(default=0.0)
    remove_unused_columns: bool = field(default=False)
    report_to: None | str | list[str] = field(default="none")  # typed so HfArgumentParser accepts it


class ProjectorTrainer(MMPhiTrainerMixin, Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, self.loss_only_inputs(inputs, return_outputs), return_outputs,
                                    num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """A loss-only evaluation (`evaluate` without `compute_metrics`) asks the model for the loss alone, as Trainer
        itself does under `--use_liger_kernel`: Trainer would build `[batch, seq, vocab]` logits to drop them. The rest
        is Trainer's step (its token count for the loss, the mean over DataParallel replicas, context parallelism)."""
        if prediction_loss_only:
            inputs = self.loss_only_inputs(inputs, return_outputs=False)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)


def freeze_for_training(
    model: MMPhiForCausalLM, train_vision_tower: bool = False, train_language_model: bool = False
) -> list[str]:
    """Everything frozen except the projector (and the tower / language model when asked: tiny pipeline only);
    returns the trainable parameter names."""
    model.requires_grad_(False)
    for module in trained_modules(model, train_vision_tower, train_language_model):
        module.requires_grad_(True)
    if train_vision_tower:
        for module in tower_modules_after_feature_layer(model):
            module.requires_grad_(False)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def trained_modules(
    model: MMPhiForCausalLM, train_vision_tower: bool, train_language_model: bool
) -> list[torch.nn.Module]:
    """The projector, plus the tower and/or the language model for the tiny pipeline."""
    modules = [model.model.multi_modal_projector]
    if train_vision_tower:
        modules.append(model.model.vision_tower)
    if train_language_model:
        modules += [model.model.language_model, model.lm_head]
    return modules


def tower_modules_after_feature_layer(model: MMPhiForCausalLM) -> list[torch.nn.Module]:
    """Tower parts the loss never reaches: the encoder layers after the deepest `vision_feature_layer` and the
    pooler's `post_layernorm`. Left trainable they get no gradient, which DistributedDataParallel refuses."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    selected = model.config.vision_feature_layer
    selected = [selected] if isinstance(selected, int) else selected
    # hidden_states[i] is the output of encoder layer i - 1 (hidden_states[0]: the embeddings)
    deepest = max(index if index >= 0 else len(layers) + 1 + index for index in selected)
    return [tower.post_layernorm, *layers[deepest:]]


def load_model(model_args: ModelArguments, training_args) -> MMPhiForCausalLM:
    """Frozen parts in the training precision's dtype (half the memory on GPU); trained parts in fp32, as mixed
    precision needs for its master weights."""
    model = MMPhiForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=training_dtype(training_args),
        attn_implementation=model_args.attn_implementation,
    )
    for module in trained_modules(model, model_args.train_vision_tower, model_args.train_language_model):
        module.float()
    return model


def build_trainer(model_args: ModelArguments, data_args: DataArguments, training_args) -> BuiltStage:
    if data_args.cache_vision_features and model_args.train_vision_tower:
        raise ValueError("--cache_vision_features needs a frozen tower; drop --train_vision_tower")
    set_seed(training_args.seed)
    # Our own class; without trust_remote_code the tokenizer loader sees the folder's auto_map and prompts [y/N].
    processor = MMPhiProcessor.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
    model = apply_speed_options(load_model(model_args, training_args), training_args)
    trainable = freeze_for_training(model, model_args.train_vision_tower, model_args.train_language_model)
    parts = ["projector"] + ["vision tower"] * model_args.train_vision_tower
    parts += ["language model"] * model_args.train_language_model
    logger.info("training %d tensors (%.2fM parameters): %s", len(trainable),
                sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, " + ".join(parts))

    train_records, eval_records, report = load_train_eval(data_args, training_args.seed)
    train, evaluation, collator = build_datasets(model, processor, data_args, training_args, train_records,
                                                 eval_records, data_args.max_length)
    logger.info("%d training samples (%d images), %d eval samples (%d images)", len(train),
                len({c.image for c in train_records}), len(evaluation) if evaluation else 0,
                len({c.image for c in eval_records}))
    if evaluation is None:
        training_args.eval_strategy = "no"
    trainer = ProjectorTrainer(model=model, args=training_args, train_dataset=train.dataset,
                               eval_dataset=evaluation.dataset if evaluation else None, data_collator=collator,
                               processing_class=processor)
    return BuiltStage(trainer, model, processor, collator, train, evaluation, [report, collator.skipped], trainable,
                      data_metrics=lambda: encoded_data_metrics(collator, train) | {
                          "padding_fraction_random_order": round(
                              padding_fraction(train.lengths, training_args.train_batch_size), 4)})


STAGE = Stage("projector", (ModelArguments, DataArguments, ProjectorTrainingArguments), build_trainer, validate_data)
parse_args = STAGE.parse_args
main = STAGE.main

if __name__ == "__main__":
    from mmphi.errors import run_command

    run_command(main)
