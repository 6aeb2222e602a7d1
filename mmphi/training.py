"""Shared bits of the training scripts: stage defaults on top of HF's argument dataclasses.

The seed trained with `paged_adamw_8bit`, fp16 on CUDA and gradient accumulation 4; we keep those defaults, add
gradient checkpointing, and choose the precision by device (bf16 where the GPU supports it, fp32 on CPU) unless the
user passes `--fp16`/`--bf16` explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments

from mmphi.errors import warn_skipped
from mmphi.loading import check_model_path

logger = logging.getLogger(__name__)



PRECISION_HELP = "mixed precision; default (unset): bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU"


def resolve_precision(args) -> None:
    """An explicit precision, from any source (command line, JSON config, code), is the user's and is kept (bf16
    autocast on a CPU is real: `--bf16 true --use_cpu true`). Only when neither `fp16` nor `bf16` was given (both
    None) is it chosen by device: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    on_gpu = torch.cuda.is_available() and not getattr(args, "use_cpu", False)
    if args.fp16 is None and args.bf16 is None:
        args.bf16 = bool(on_gpu and torch.cuda.is_bf16_supported())
        args.fp16 = bool(on_gpu and not args.bf16)
        return
    args.fp16, args.bf16 = bool(args.fp16), bool(args.bf16)
    if args.fp16 and not on_gpu:
        logger.warning("--fp16 without a CUDA device: the Trainer does not autocast to fp16 on a CPU (use --bf16)")


def take_over_push(args) -> None:
    """`--push_to_hub` pushes the stage's final folder once it is complete (`push_final`), with a model card built
    from the run, instead of the Trainer's pushes of output_dir at every save (which would also upload stage 2's
    merged/ sub-folder and a card that knows nothing of the run)."""
    args.push_final_to_hub = bool(args.push_to_hub)
    args.push_to_hub = False


def take_over_liger(args) -> None:
    """`--use_liger_kernel` is applied by the stage (`apply_speed_options`): Liger's own patches do not cover Phi."""
    args.fused_kernels = bool(args.use_liger_kernel)
    args.use_liger_kernel = False


def resolve_stage_arguments(args) -> None:
    """What every stage's training-arguments class does after parsing."""
    resolve_precision(args)
    take_over_push(args)
    take_over_liger(args)


def apply_speed_options(model, training_args) -> torch.nn.Module:
    """The speed options a stage applies to its model itself (`--use_liger_kernel`); `--torch_compile` and
    `--attn_implementation` go through the Trainer and `from_pretrained` as usual."""
    if getattr(training_args, "fused_kernels", False):
        from mmphi.kernels import apply_liger_kernel

        apply_liger_kernel(model, device_is_cuda=torch.cuda.is_available() and not training_args.use_cpu)
    return model


@dataclass
class StageTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the MM-Phi stage defaults; every Trainer flag still works."""

    output_dir: str = field(default="outputs/run")
    optim: str = field(default="paged_adamw_8bit")
    gradient_accumulation_steps: int = field(default=4)
    gradient_checkpointing: bool = field(default=True)
    lr_scheduler_type: str = field(default="cosine")
    warmup_steps: float = field(default=0.03)
    logging_steps: float = field(default=10)
    save_safetensors: bool = field(default=True)
    report_to: None | str | list[str] = field(default="none")
    fp16: bool | None = field(default=None, metadata={"help": PRECISION_HELP})
    bf16: bool | None = field(default=None, metadata={"help": PRECISION_HELP})

    def __post_init__(self):
        resolve_stage_arguments(self)
        super().__post_init__()


@dataclass
class BuiltStage:
    """What a stage's `build_trainer(model_args, data_args, training_args)` returns: the trainer, ready for
    `.train()`, with its parts (the demo, benchmarks and tests reach them here, never through private names)."""

    trainer: object
    model: torch.nn.Module
    processor: object = None
    collator: object = None
    train: object = None  # the training samples (stages 1-2: EncodedSamples; stage 0: the packed blocks)
    evaluation: object = None
    report: object = None  # records skipped while reading the data (SkipReport)
    trainable: list[str] = field(default_factory=list)


def parse_stage_args(dataclass_types: tuple, argv: list[str] | None = None):
    """The stage's argument dataclasses from the command line, or from one `.json` file given as the only argument."""
    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def train_and_evaluate(stage: BuiltStage, resume_from_checkpoint=None) -> dict:
    """Stages 1-2: train, then evaluate; the metrics with the wall time, the training batches' padding fraction
    (read before evaluation adds its batches), the trainable size, what truncation did and the skipped records."""
    trainer = stage.trainer
    start = time.perf_counter()
    metrics = dict(trainer.train(resume_from_checkpoint=resume_from_checkpoint).metrics)
    metrics["train_wall_s"] = round(time.perf_counter() - start, 1)
    metrics["padding_fraction"] = round(stage.collator.padding_fraction, 4)
    if stage.evaluation is not None:
        metrics.update(trainer.evaluate())
    metrics.update(
        trainable_parameters=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        truncated=stage.train.truncation.truncated, dropped_too_long=stage.train.truncation.dropped,
        skipped_bad_records=warn_skipped(logger, stage.report, stage.collator.skipped),
    )
    return metrics


RUN_INFO = "run_info.json"
TRAINING_KEYS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "optim", "lr_scheduler_type", "warmup_steps", "weight_decay", "bf16",
                 "fp16", "gradient_checkpointing", "seed")
DATA_KEYS = ("dataset_name", "dataset_config_name", "data_path", "eval_data_path", "train_files", "validation_files")


def describe_run(stage: str, model_args, data_args, training_args, **extra) -> dict:
    """What a model card may say about the run (JSON, read by `mmphi.hub`): the stage, what it started from, the
    data, the training settings, the library versions."""
    data = {key: getattr(data_args, key) for key in DATA_KEYS if getattr(data_args, key, None)}
    base = getattr(model_args, "model_name_or_path", None)
    return {
        "stage": stage,
        "base_model": base,
        "data": data,
        "training": {key: getattr(training_args, key) for key in TRAINING_KEYS if hasattr(training_args, key)}
        | {"world_size": training_args.world_size},
        "model_arguments": _json_safe(dataclasses.asdict(model_args)),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "datasets": datasets.__version__},
        **extra,
    }


def _json_safe(values: dict) -> dict:
    return json.loads(json.dumps(values, default=str))


def record_run(trainer, metrics: dict, run_info: dict | None = None) -> None:
    """Print the run's metrics and write all_results.json and trainer_state.json, as HF's example scripts do, plus
    run_info.json (`describe_run`) for the model card."""
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    trainer.save_state()
    if run_info is not None:
        write_run_info(trainer.args.output_dir, run_info)


def write_run_info(folder: str, run_info: dict) -> None:
    with open(os.path.join(folder, RUN_INFO), "w", encoding="utf-8") as handle:
        json.dump(_json_safe(run_info), handle, indent=2)


def push_final(training_args, folder: str) -> str | None:
    """With `--push_to_hub`: push the stage's final folder (a full model, or an adapter with its processor) to
    `--hub_model_id` (default: the output folder's name) with a card built from the run. Returns the repo id."""
    if not getattr(training_args, "push_final_to_hub", False):
        return None
    from mmphi import hub

    repo_id = training_args.hub_model_id or os.path.basename(os.path.normpath(training_args.output_dir))
    argv = ["--model", folder, "--repo_id", repo_id, "--commit_message", f"Upload {os.path.basename(folder)}"]
    argv += ["--private"] if training_args.hub_private_repo else []
    argv += ["--token", training_args.hub_token] if training_args.hub_token else []
    hub.push(hub.parse_args(argv))
    return repo_id


def configure_logging(training_args) -> None:
    """Our INFO lines from the main process only; the other processes of a multi-GPU run log warnings and errors, as
    in HF's example scripts (`--log_level` / `--log_level_replica` override both)."""
    if training_args.log_level != "passive" or training_args.log_level_replica != "warning":
        level = training_args.get_process_log_level()
    else:
        level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # also when a handler was set up before us
    if not training_args.should_log:  # libraries too: a replica repeats the main process's progress and notes
        transformers.utils.logging.set_verbosity(max(level, logging.WARNING))
        datasets.utils.logging.set_verbosity(max(level, logging.WARNING))
        datasets.utils.logging.disable_progress_bar()


def stage_main(argv: list[str] | None, parse_args, validate, run) -> dict | None:
    """A stage script's command line: parse, then either scan the data (`--validate_data`; exits 0 when clean) or
    train, printing the metrics."""
    model_args, data_args, training_args = parse_args(argv)
    if getattr(model_args, "model_name_or_path", None):  # before the data is read: minutes at real size
        check_model_path(model_args.model_name_or_path)
    configure_logging(training_args)
    if data_args.validate_data:
        sys.exit(validate(data_args))
    metrics = run(model_args, data_args, training_args)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, indent=1))
    return metrics
