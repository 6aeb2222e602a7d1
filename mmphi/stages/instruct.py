"""The instruct stage: instruction tuning on LLaVA-Instruct conversations with TRL's SFTTrainer (QLoRA by default).

The language model is loaded in 4-bit (nf4, double quantization, compute dtype by device) and trained through LoRA
adapters on its q_proj/k_proj/v_proj/dense/fc1/fc2 (the vision tower's own q/k/v/fc layers are never wrapped); the
projector trains fully and is saved with the adapter (`--lora_modules_to_save`); the vision tower stays frozen.
The model flags are TRL's `ModelConfig`: `--load_in_8bit true` or `--load_in_4bit false` change the base precision,
`--use_peft false --load_in_4bit false` trains the whole language model (+ projector) without LoRA. Multi-turn
conversations go through the processor's chat template, with the loss on the answers and the EOS that ends each of
them only (mmphi/data/); samples longer than `--max_length` are cut after the image (never inside it) or dropped, and
counted; batches are grouped by length and the padding fraction is reported.
Every `SFTConfig` flag works (`--resume_from_checkpoint`, `--report_to tensorboard`, `accelerate launch`).

    # the real recipe (GPU): the projector stage's output, LLaVA-Instruct-150K with COCO train2017 images
    python scripts/instruct.py --config recipes/real/instruct.yaml --model_name_or_path outputs/projector \
        --data_path llava/llava_instruct_150k.json --image_folder coco/train2017 --output_dir outputs/instruct

    # the offline tiny pipeline (2-core CPU), see BENCHMARKS.md "Instruct (tiny)"
    python scripts/instruct.py --config recipes/tiny/instruct.yaml --model_name_or_path outputs/projector-tiny \
        --data_path data/synthetic/llava_instruct_train.json --image_folder data/synthetic/images \
        --output_dir outputs/instruct-tiny --merge

The output folder holds the adapter (LoRA + projector, safetensors) and the processor; `--merge` (or
scripts/merge_lora.py) also writes a full MM-Phi folder (`<output_dir>/merged` by default) that loads with
`AutoModelForCausalLM.from_pretrained(D, trust_remote_code=True)`. `--validate_data` scans the data and exits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field

import torch
from transformers import Trainer, set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, get_peft_config, get_quantization_config

from mmphi.data import build_datasets, load_train_eval, validate_data
from mmphi.loading import MERGE_TARGETS, check_replaceable, merge_lora, training_dtype, weights_fingerprint
from mmphi.stages.arguments import EXPORT_LLAVA_HELP, MultimodalDataArguments
from mmphi.training import (
    BuiltStage,
    MMPhiTrainerMixin,
    Stage,
    StageOptions,
    apply_speed_options,
    encoded_data_metrics,
    write_run_info,
)
from modeling_mmphi import MMPhiForCausalLM
from processing_mmphi import MMPhiProcessor

logger = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]


@dataclass
class ModelArguments(ModelConfig):
    """TRL's `ModelConfig` (read by `get_peft_config` and `get_quantization_config`) with QLoRA's defaults: the
    language model in 4-bit nf4 with double quantization, LoRA r=64 alpha=16 on its layers, the projector trained
    fully and saved with the adapter."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "an MM-Phi folder (the projector stage's output)"})
    dtype: str | None = field(default="auto", metadata={
        "help": "dtype of the frozen weights; auto: the training precision's (bf16 / fp16 / fp32)",
        "choices": ["auto", "bfloat16", "float16", "float32"]})
    attn_implementation: str | None = field(default="sdpa", metadata={"help": "eager, sdpa, flash_attention_2, ..."})
    use_peft: bool = field(default=True, metadata={
        "help": "train LoRA adapters; false trains the language model's own weights (with --load_in_4bit false)"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scale numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: list(LORA_TARGETS),
        metadata={"help": "layer names inside the language model (model.language_model) that get LoRA adapters"},
    )
    lora_modules_to_save: list[str] | None = field(
        default_factory=lambda: ["multi_modal_projector"],
        metadata={"help": "modules trained fully and saved with the adapter (the projector; the tiny pipeline adds "
                          "lm_head, see recipes/tiny/instruct.yaml)", "aliases": ["--modules_to_save"]},
    )
    load_in_4bit: bool = field(default=True, metadata={
        "help": "the frozen language model in 4-bit nf4 (QLoRA); --load_in_8bit true replaces it with int8"})
    use_bnb_nested_quant: bool = field(default=True, metadata={"help": "double quantization of the 4-bit scales"})
    merge: bool = field(default=False, metadata={"help": "also write base + adapter as one full MM-Phi folder"})
    merge_into: str = field(
        default="dequantized", metadata={"help": "with --merge: fold LoRA into the NF4-dequantized base weights the "
                                                 "adapter was trained on, or the original ones",
                                         "choices": list(MERGE_TARGETS)},
    )
    merged_output_dir: str | None = field(default=None, metadata={"help": "default: <output_dir>/merged"})
    export_llava: str | None = field(default=None, metadata={"help": EXPORT_LLAVA_HELP + "; with LoRA, needs --merge"})

    def __post_init__(self):
        if self.model_name_or_path is None:
            raise ValueError("--model_name_or_path is required: an MM-Phi folder (the projector stage's output)")
        if self.load_in_8bit:
            self.load_in_4bit = False
        super().__post_init__()
        # at parse time: at real size, load_model comes after reading LLaVA-Instruct (minutes), on every rank
        if not self.use_peft and self.quantization != "none":
            raise ValueError("--use_peft false trains the language model's own weights: add --load_in_4bit false")
        if not self.use_peft and self.merge:  # else output_dir/merged, which a script may read, never appears
            raise ValueError("--merge folds a LoRA adapter into its base; with --use_peft false, output_dir already "
                             "holds the full model: drop --merge")
        if self.export_llava and self.use_peft and not self.merge:
            raise ValueError("--export_llava writes a full model: with LoRA, add --merge (the export is made from the "
                             "merged folder)")
        self.refuse_what_the_base_cannot_reproduce()

    def refuse_what_the_base_cannot_reproduce(self) -> None:
        """The merge (into the NF4-dequantized weights) and the unmerged adapter's loading (chat, evaluation,
        `mmphi.loading.bnb_config`) rebuild the base as nf4 with double quantization from the folder as given: an
        adapter trained on another 4-bit base or on another revision would be merged into weights it never saw."""
        other_4bit = self.bnb_4bit_quant_type != "nf4" or not self.use_bnb_nested_quant or self.bnb_4bit_quant_storage
        if self.load_in_4bit and other_4bit:
            raise ValueError("--bnb_4bit_quant_type / --use_bnb_nested_quant / --bnb_4bit_quant_storage: the merge "
                             "and the adapter's loading rebuild the base as nf4 with double quantization; keep those "
                             "(or --load_in_4bit false)")
        if self.model_revision != "main":
            raise ValueError(f"--model_revision {self.model_revision}: download that revision (`hf download "
                             f"{self.model_name_or_path} --revision {self.model_revision} --local-dir DIR`) and pass "
                             "DIR as --model_name_or_path, so the merge and the card read the same base")

    @property
    def quantization(self) -> str:
        """The base's precision as the merge and the run record name it: "4bit", "8bit" or "none"."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else "none"


@dataclass
class DataArguments(MultimodalDataArguments):
    """Any registered format: LLaVA-Instruct (llava_instruct_150k.json) or COCO captions."""


@dataclass
class InstructSFTConfig(StageOptions, SFTConfig):
    """SFTConfig with the stage defaults (the seed's paged 8-bit AdamW and accumulation 4; QLoRA's learning rate;
    length-grouped batches) and precision chosen by device unless given: SFTConfig's bf16=True would fail on a CPU."""

    output_dir: str = field(default="outputs/instruct")
    optim: str = field(default="paged_adamw_8bit")
    gradient_accumulation_steps: int = field(default=4)
    learning_rate: float = field(default=2e-4)
    lr_scheduler_type: str = field(default="cosine")
    warmup_steps: float = field(default=0.03)
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "group_by_length (less padding on long, varied conversations such as LLaVA-Instruct's) or "
                          "random. Use random for short-answer data: there a record's length gives its answer away "
                          "(\" yes\" is a token longer than \" no\"), so length-grouped batches lean to one answer "
                          "and the model learns a prior (BENCHMARKS.md \"Instruct (tiny)\")"},
    )
    length_column_name: str = field(default="length")
    # Our data module tokenizes, masks and truncates; the collator loads the images.
    dataset_kwargs: dict | str | None = field(default_factory=lambda: {"skip_prepare_dataset": True})
    remove_unused_columns: bool = field(default=False)
    report_to: None | str | list[str] = field(default="none")  # typed so HfArgumentParser accepts it


# --------------------------------------------------------------------------------------------------------- model


def frozen_dtype(model_args: ModelArguments, args) -> torch.dtype:
    """`--dtype`, or with `auto` the training precision's (half the memory of the frozen weights on a GPU)."""
    return training_dtype(args) if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)


def load_model(model_args: ModelArguments, args) -> MMPhiForCausalLM:
    dtype = frozen_dtype(model_args, args)
    # TRL's helper computes in the dtype it is given: the frozen weights', never the string "auto"
    quantization_config = get_quantization_config(dataclasses.replace(model_args, dtype=dtype))
    kwargs = {}
    if quantization_config is not None and torch.cuda.is_available() and not args.use_cpu:
        kwargs["device_map"] = {"": args.local_process_index}  # bitsandbytes quantizes as the weights reach the GPU
    model = MMPhiForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=dtype, quantization_config=quantization_config,
        attn_implementation=model_args.attn_implementation, **kwargs,
    )
    model.model.vision_tower.requires_grad_(False)
    if not model_args.use_peft:  # trained weights in fp32: mixed precision keeps its master copy there
        model.model.multi_modal_projector.float()
        model.model.language_model.float()
        model.lm_head.float()
    return model


def lora_config(model_args: ModelArguments):
    """TRL's `get_peft_config`, with the targets as a regex on the full module name that reaches the language model's
    layers only (CLIP has q_proj/k_proj/v_proj/fc1/fc2 too); the projector trains fully and is saved with the
    adapter (`lora_modules_to_save`)."""
    targets = model_args.lora_target_modules
    targets = [targets] if isinstance(targets, str) else targets  # ModelConfig turns a one-item list into its item
    return dataclasses.replace(get_peft_config(model_args),
                               target_modules=rf"model\.language_model\..*\.({'|'.join(targets)})")


def trainable_parameter_names(model) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def keep_trainable_in_fp32(model) -> None:
    """Everything that trains (LoRA A/B, the projector, lm_head in `modules_to_save`) holds fp32 master weights, in
    every precision: autocast keeps the matmuls in bf16/fp16, while small Adam updates would round away in bf16
    weights. TRL casts the trainable weights of a model it sees as quantized to bf16; we cast back after it,
    whatever it detected."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


class InstructTrainer(MMPhiTrainerMixin, SFTTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """SFTTrainer's loss (its fused LM head, with entropy and token accuracy logged) where it scores only the
        answer tokens: on CUDA/XPU, in Triton. Elsewhere (a CPU) it scores every position, image and prompt tokens
        too, in fp32 tiles: there the model's own loss (the same mean over answer tokens, `Trainer.compute_loss`) is
        less time per step of the tiny instruct stage, and less again from the answer tokens only
        (`loss_only_inputs`; BENCHMARKS.md "Instruct (tiny)")."""
        if self.args.device.type in ("cuda", "xpu"):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {**self.loss_only_inputs(inputs, return_outputs), "use_cache": False}
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


# ----------------------------------------------------------------------------------------------------------- run


def build_trainer(model_args: ModelArguments, data_args: DataArguments, args: InstructSFTConfig) -> BuiltStage:
    """The SFTTrainer with its data (the same dataset and collator as the projector stage's) and model."""
    set_seed(args.seed)
    if model_args.merge:  # before hours of training: the merge replaces that folder at the end
        check_replaceable(merged_output_dir(model_args, args))
    processor = MMPhiProcessor.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
    train_records, eval_records, report = load_train_eval(data_args, args.seed)
    model = apply_speed_options(load_model(model_args, args), args)
    train, evaluation, collator = build_datasets(model, processor, data_args, args, train_records, eval_records,
                                                 args.max_length)
    logger.info("%d training samples, %d eval samples", len(train), len(evaluation) if evaluation else 0)
    if evaluation is None:
        args.eval_strategy = "no"
    trainer = InstructTrainer(
        model=model, args=args, train_dataset=train.dataset,
        eval_dataset=evaluation.dataset if evaluation else None, data_collator=collator,
        processing_class=processor, peft_config=lora_config(model_args) if model_args.use_peft else None,
    )
    keep_trainable_in_fp32(trainer.model)
    trainable = trainable_parameter_names(trainer.model)
    logger.info("training %d tensors (%.2fM parameters): %s", len(trainable),
                sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) / 1e6,
                "LoRA adapters + " + " + ".join(model_args.lora_modules_to_save or []) if model_args.use_peft
                else "language model + projector")
    lora = {"lora_r": model_args.lora_r, "lora_alpha": model_args.lora_alpha, "lora_dropout": model_args.lora_dropout,
            "lora_target_modules": model_args.lora_target_modules,
            "modules_to_save": model_args.lora_modules_to_save, "quantization": model_args.quantization,
            } if model_args.use_peft else None
    # the adapter's base, which loading and merging check (None: a hub id, no local weights to read)
    base_fingerprint = weights_fingerprint(model_args.model_name_or_path) if lora else None
    return BuiltStage(trainer, trainer.model, processor, collator, train, evaluation, [report, collator.skipped],
                      trainable, data_metrics=lambda: encoded_data_metrics(collator, train),
                      run_info={"lora": lora, "base_fingerprint": base_fingerprint})


def merged_output_dir(model_args: ModelArguments, args) -> str:
    return model_args.merged_output_dir or os.path.join(args.output_dir, "merged")


def merge_after_training(stage: BuiltStage, model_args: ModelArguments, args, metrics: dict, run_info: dict) -> str:
    """With `--merge`: base + adapter as one full MM-Phi folder (default `<output_dir>/merged`), with the run's
    record; returns the folder to push (the merged one when there is one)."""
    if not model_args.merge:
        return args.output_dir
    merged_dir = merged_output_dir(model_args, args)
    merge_lora(model_args.model_name_or_path, args.output_dir, merged_dir, merge_into=model_args.merge_into,
               base_quantization=model_args.quantization, quantized_from=frozen_dtype(model_args, args))
    metrics["merged_output_dir"] = merged_dir
    write_run_info(merged_dir, run_info | {"merged": True, "merge_into": model_args.merge_into})
    shutil.copy2(os.path.join(args.output_dir, "trainer_state.json"), merged_dir)  # steps and losses
    return merged_dir


STAGE = Stage("instruct", (ModelArguments, DataArguments, InstructSFTConfig), build_trainer, validate_data,
              finish=merge_after_training)
parse_args = STAGE.parse_args
main = STAGE.main

if __name__ == "__main__":
    from mmphi.errors import run_command

    run_command(main)
