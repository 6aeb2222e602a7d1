"""Stage 2: instruction tuning on LLaVA-Instruct conversations with TRL's SFTTrainer (QLoRA by default).

The language model is loaded in 4-bit (nf4, double quantization, compute dtype by device) and trained through LoRA
adapters on its q_proj/k_proj/v_proj/dense/fc1/fc2 (the vision tower's own q/k/v/fc layers are never wrapped); the
projector trains fully and is saved with the adapter (`modules_to_save`); the vision tower stays frozen.
`--quantization 8bit|none` changes the base precision, `--full_finetune` trains the whole language model (+ projector)
without LoRA. Multi-turn conversations go through the processor's chat template, with the loss on the answers and
the EOS that ends each of them only (scripts/mmphi_data.py); samples longer than `--max_length` are cut after the
image (never inside it) or dropped, and counted; batches are grouped by length and the padding fraction is reported.
Every `SFTConfig` flag works (`--resume_from_checkpoint`, `--report_to tensorboard`, `accelerate launch`).

    # the real recipe (GPU): stage-1 output, LLaVA-Instruct-150K with COCO train2017 images
    python scripts/finetune_instruct.py --model_name_or_path outputs/stage1 \
        --data_path llava/llava_instruct_150k.json --image_folder coco/train2017 \
        --per_device_train_batch_size 8 --output_dir outputs/stage2 --merge

    # the offline tiny pipeline (2-core CPU), see BENCHMARKS.md "Stages 1-2 tiny run" (flags in TINY_RECIPE)
    python scripts/finetune_instruct.py --model_name_or_path outputs/stage1-tiny \
        --data_path data/synthetic/llava_instruct_train.json --image_folder data/synthetic/images \
        --output_dir outputs/stage2-tiny --merge ...

The output folder holds the adapter (LoRA + projector, safetensors) and the processor; `--merge` (or
scripts/merge_lora.py) also writes a full MM-Phi folder (`<output_dir>/merged` by default) that loads with
`AutoModelForCausalLM.from_pretrained(D, trust_remote_code=True)`. `--validate_data` scans the data and exits.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import common  # noqa: F401  (puts the repo root on sys.path)
import datasets
import torch
from build_model import save_mmphi
from common import parse_stage_args, record_run, resolve_precision, stage_main
from merge_lora import merge_lora
from mmphi_data import (
    SKIP_HINT,
    BadRecordError,
    ConversationDataset,
    MMPhiDataCollator,
    SkipReport,
    load_image,
    load_llava_records,
    split_by_image,
    validate_llava_file,
    validation_exit,
)
from text_data import warn_skipped
from transformers import BitsAndBytesConfig, set_seed
from trl import SFTConfig, SFTTrainer

from modeling_mmphi import MMPhiForCausalLM
from processing_mmphi import MMPhiProcessor

logger = logging.getLogger("finetune_instruct")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
# The tiny pipeline's stage 2 on a 2-core CPU (see BENCHMARKS.md "Stages 1-2 tiny run" for what it reaches).
# The tiny Phi's lm_head must move for the short answers ("red", "3"): with LoRA + projector only, the answer loss
# stayed at 3.3 after 300 steps; saving lm_head with the adapter (and LoRA scale alpha/r = 2) brings it under 1.
TINY_RECIPE = ("--max_steps 250 --per_device_train_batch_size 16 --gradient_accumulation_steps 1 "
               "--learning_rate 1e-3 --gradient_checkpointing false --optim adamw_torch --warmup_steps 10 "
               "--lr_scheduler_type cosine --logging_steps 10 --val_fraction 0 --lora_alpha 128 --lora_dropout 0 "
               "--modules_to_save multi_modal_projector lm_head")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "an MM-Phi folder (the stage-1 output)"})
    quantization: str = field(
        default="4bit", metadata={"help": "precision of the frozen language model", "choices": ["4bit", "8bit", "none"]}
    )
    full_finetune: bool = field(
        default=False, metadata={"help": "train the whole language model (and projector) without LoRA; needs "
                                         "--quantization none"}
    )
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.1)
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGETS),
        metadata={"help": "layer names inside the language model (model.language_model) that get LoRA adapters"},
    )
    modules_to_save: list[str] = field(
        default_factory=lambda: ["multi_modal_projector"],
        metadata={"help": "modules trained fully and saved with the adapter (the projector; the tiny pipeline adds "
                          "lm_head, see TINY_RECIPE)"},
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa, flash_attention_2, ..."})
    merge: bool = field(default=False, metadata={"help": "also write base + adapter as one full MM-Phi folder"})
    merged_output_dir: str | None = field(default=None, metadata={"help": "default: <output_dir>/merged"})


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "LLaVA-Instruct JSON (llava_instruct_150k.json)"})
    image_folder: str | None = field(default=None, metadata={"help": "folder of the images (default: the JSON's)"})
    eval_data_path: str | None = field(
        default=None, metadata={"help": "held-out LLaVA JSON; without it --val_fraction of the images"}
    )
    eval_image_folder: str | None = field(default=None, metadata={"help": "images of --eval_data_path"})
    val_fraction: float = field(default=0.02, metadata={"help": "fraction of images held out (split by image)"})
    max_eval_samples: int | None = field(default=500, metadata={"help": "evaluate on at most this many records"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use at most this many training records"})
    skip_bad_records: bool = field(
        default=False, metadata={"help": "skip bad records/images (counted and reported) instead of failing"}
    )
    validate_data: bool = field(default=False, metadata={"help": "scan the data (records + images) and exit"})


@dataclass
class InstructSFTConfig(SFTConfig):
    """SFTConfig with the stage defaults (the seed's paged 8-bit AdamW and accumulation 4; QLoRA's learning rate;
    length-grouped batches) and precision chosen by device: SFTConfig's bf16=True would fail on a CPU."""

    output_dir: str = field(default="outputs/stage2")
    optim: str = field(default="paged_adamw_8bit")
    gradient_accumulation_steps: int = field(default=4)
    learning_rate: float = field(default=2e-4)
    lr_scheduler_type: str = field(default="cosine")
    warmup_steps: float = field(default=0.03)
    train_sampling_strategy: str = field(default="group_by_length")
    length_column_name: str = field(default="length")
    # Our data module tokenizes, masks and truncates; the collator loads the images.
    dataset_kwargs: dict | str | None = field(default_factory=lambda: {"skip_prepare_dataset": True})
    remove_unused_columns: bool = field(default=False)
    report_to: None | str | list[str] = field(default="none")  # typed so HfArgumentParser accepts it

    def __post_init__(self):
        resolve_precision(self)
        super().__post_init__()


# ---------------------------------------------------------------------------------------------------------- data


class ImageLoadingCollator:
    """SFTTrainer only takes `datasets` datasets, so rows carry tokens and the image path; images are read here.
    An unreadable image raises an error naming its record, or with `skip_bad_records` drops the sample (counted).
    Training and evaluation batches are counted apart, so the padding fraction is the training batches'."""

    def __init__(self, processor, skip_bad_records: bool = False):
        self.processor = processor
        self.skip_bad_records = skip_bad_records
        self.skipped = SkipReport()
        self.train_batches = MMPhiDataCollator(processor)
        self.eval_batches = MMPhiDataCollator(processor)
        self.evaluating = False

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        features = [feature for feature in map(self._feature, rows) if feature is not None]
        if not features:
            raise BadRecordError(f"every sample of a batch failed to load: {self.skipped.summary()}")
        return (self.eval_batches if self.evaluating else self.train_batches)(features)

    def _feature(self, row: dict) -> dict | None:
        feature = {"input_ids": row["input_ids"], "labels": row["labels"]}
        if row["image"] is None:
            return feature
        try:
            image = load_image(row["image"])
        except BadRecordError as error:
            if not self.skip_bad_records:
                raise BadRecordError(f"{row['location']}: {error}{SKIP_HINT}") from None
            self.skipped.add(row["location"], str(error))
            logger.warning("skipping a bad sample (%d so far): %s: %s", self.skipped.total, row["location"], error)
            return None
        feature["pixel_values"] = self.processor.image_processor([image], return_tensors="pt")["pixel_values"]
        return feature

    @property
    def padding_fraction(self) -> float:
        return self.train_batches.padding_fraction


def to_hf_dataset(samples: ConversationDataset) -> datasets.Dataset:
    """The tokenized samples (labels already masked and truncated) as a `datasets.Dataset` with a length column."""
    return datasets.Dataset.from_dict({
        "input_ids": [ids.tolist() for ids in samples.input_ids],
        "labels": [labels.tolist() for labels in samples.labels],
        "image": [c.image for c in samples.conversations],
        "location": [c.location for c in samples.conversations],
        "length": list(samples.lengths),
    })


def load_conversations(data_args: DataArguments, seed: int):
    """(train, eval, skip report): held out by image, so no image is on both sides."""
    report = SkipReport()
    records = load_llava_records(data_args.data_path, data_args.image_folder, data_args.skip_bad_records, report)
    if data_args.eval_data_path:
        train = records
        evaluation = load_llava_records(data_args.eval_data_path, data_args.eval_image_folder,
                                        data_args.skip_bad_records, report)
        overlap = {c.image for c in train if c.image} & {c.image for c in evaluation if c.image}
        if overlap:
            raise ValueError(f"{len(overlap)} image(s) are in both the training and the eval file, e.g. "
                             f"{sorted(overlap)[0]}: validation must be held out by image")
    else:
        train, evaluation = split_by_image(records, data_args.val_fraction, seed)
    if data_args.max_train_samples is not None:
        train = train[: data_args.max_train_samples]
    if data_args.max_eval_samples is not None:
        evaluation = evaluation[: data_args.max_eval_samples]
    return train, evaluation, report


# --------------------------------------------------------------------------------------------------------- model


def training_dtype(args) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def quantization_config_for(quantization: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """QLoRA's nf4 + double quantization, computing in the training dtype (fp32 on CPU). Only the language model is
    quantized: MMPhiForCausalLM.from_pretrained keeps the tower, projector and lm_head in full precision."""
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(model_args: ModelArguments, args) -> MMPhiForCausalLM:
    if model_args.full_finetune and model_args.quantization != "none":
        raise ValueError("--full_finetune trains the language model's own weights: use it with --quantization none")
    dtype = training_dtype(args)
    quantization_config = quantization_config_for(model_args.quantization, dtype)
    kwargs = {}
    if quantization_config is not None and torch.cuda.is_available() and not args.use_cpu:
        kwargs["device_map"] = {"": args.local_process_index}  # bitsandbytes quantizes as the weights reach the GPU
    model = MMPhiForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=dtype, quantization_config=quantization_config,
        attn_implementation=model_args.attn_implementation, **kwargs,
    )
    model.model.vision_tower.requires_grad_(False)
    if model_args.full_finetune:  # trained weights in fp32: mixed precision keeps its master copy there
        model.model.multi_modal_projector.float()
        model.model.language_model.float()
        model.lm_head.float()
    return model


def lora_config(model_args: ModelArguments):
    """LoRA on the language model's layers only (a regex on the full module name: CLIP has q_proj/k_proj/v_proj/fc1/
    fc2 too), with the projector trained fully and saved with the adapter."""
    from peft import LoraConfig

    targets = "|".join(model_args.lora_target_modules)
    return LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout, bias="none",
        target_modules=rf"model\.language_model\..*\.({targets})", modules_to_save=list(model_args.modules_to_save),
        task_type="CAUSAL_LM",
    )


def trainable_parameter_names(model) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def keep_trainable_in_fp32(model, args) -> None:
    """TRL casts the trainable weights of a quantized model to bf16 (QLoRA's recipe on GPUs). Training in fp32 or
    fp16 keeps them in fp32: bf16 matmuls are slow on CPUs, and fp16 mixed precision needs fp32 master weights."""
    if args.bf16:
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


class InstructTrainer(SFTTrainer):
    def evaluate(self, *args, **kwargs):
        self.data_collator.evaluating = True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.data_collator.evaluating = False


# ----------------------------------------------------------------------------------------------------------- run


def parse_args(argv: list[str] | None = None):
    return parse_stage_args((ModelArguments, DataArguments, InstructSFTConfig), argv)


def validate(data_args: DataArguments) -> int:
    status = 0
    for path, folder in ((data_args.data_path, data_args.image_folder),
                         (data_args.eval_data_path, data_args.eval_image_folder)):
        if path:
            status |= validation_exit(path, *validate_llava_file(path, folder))
    return status


def run_stage2(model_args: ModelArguments, data_args: DataArguments, args: InstructSFTConfig) -> dict:
    """Train, save the adapter + processor (or the full model) to output_dir, optionally merge; returns metrics."""
    set_seed(args.seed)
    processor = MMPhiProcessor.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
    train_records, eval_records, report = load_conversations(data_args, args.seed)
    train = ConversationDataset(train_records, processor, max_length=args.max_length)
    evaluation = ConversationDataset(eval_records, processor, max_length=args.max_length) if eval_records else None
    logger.info("%d training samples, %d eval samples", len(train), len(evaluation) if evaluation else 0)
    if evaluation is None:
        args.eval_strategy = "no"

    model = load_model(model_args, args)
    collator = ImageLoadingCollator(processor, data_args.skip_bad_records)
    trainer = InstructTrainer(
        model=model, args=args, train_dataset=to_hf_dataset(train),
        eval_dataset=to_hf_dataset(evaluation) if evaluation else None, data_collator=collator,
        processing_class=processor, peft_config=None if model_args.full_finetune else lora_config(model_args),
    )
    keep_trainable_in_fp32(trainer.model, args)
    trainable = trainable_parameter_names(trainer.model)
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    logger.info("training %d tensors (%.2fM parameters): %s", len(trainable), n_trainable / 1e6,
                "language model + projector" if model_args.full_finetune
                else "LoRA adapters + " + " + ".join(model_args.modules_to_save))

    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = dict(result.metrics)
    metrics["train_wall_s"] = round(time.perf_counter() - start, 1)
    metrics["padding_fraction"] = round(collator.padding_fraction, 4)
    if evaluation is not None:
        metrics.update(trainer.evaluate())
    metrics.update(
        trainable_parameters=n_trainable, truncated=train.truncation.truncated,
        dropped_too_long=train.truncation.dropped, skipped_bad_records=warn_skipped(logger, report, collator.skipped),
    )
    if trainer.is_world_process_zero():
        save_outputs(trainer, processor, model_args, args, metrics)
    return metrics


def save_outputs(trainer, processor, model_args: ModelArguments, args, metrics: dict) -> None:
    if model_args.full_finetune:
        save_mmphi(trainer.model, processor, args.output_dir)
    else:
        trainer.save_model(args.output_dir)  # adapter (LoRA + projector) and the processor
    record_run(trainer, metrics)
    if model_args.merge and not model_args.full_finetune:
        merged_dir = model_args.merged_output_dir or os.path.join(args.output_dir, "merged")
        merge_lora(model_args.model_name_or_path, args.output_dir, merged_dir)
        metrics["merged_output_dir"] = merged_dir


def main(argv: list[str] | None = None) -> dict | None:
    return stage_main(argv, parse_args, validate, run_stage2)


if __name__ == "__main__":
    main()
