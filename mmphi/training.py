"""The one stage skeleton (`Stage`) and what every stage shares: stage defaults on top of HF's argument dataclasses,
the argument parser (`--config` recipe files), the Trainer mixin of the projector and instruct stages, the run record
and the push.

A stage module supplies its argument dataclasses and `build_trainer`; `Stage` runs it: `--validate_data`, resume,
train (stopped by an fp16 overflow), evaluate, skip report, the final save (a full model from every engine: DDP,
FSDP, DeepSpeed), record, loss curve, push. The seed trained with `paged_adamw_8bit`, fp16 on CUDA and gradient
accumulation 4; we keep those defaults, add gradient checkpointing, and choose the precision by device (bf16 where
the GPU supports it, fp32 on CPU) unless the user passes `--fp16`/`--bf16` explicitly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import TrlParser

from mmphi import quiet_library_notices
from mmphi.build import enable_kv_cache
from mmphi.data.encoding import COLLATED_COUNTS, gather_collator_counts, sample_lengths
from mmphi.errors import SkipReport, warn_skipped
from mmphi.loading import check_model_path, check_replaceable

logger = logging.getLogger(__name__)



PRECISION_HELP = ("mixed precision; default (unset): bf16 on GPUs that support it natively (compute capability 8.0+), "
                  "fp16 on older GPUs, fp32 on CPU (bf16 on a CPU without AVX-512 runs matrix products in torch's "
                  "reference GEMM, ~180x slower than fp32 in a backward: keep fp32 there)")


def resolve_precision(args) -> None:
    """An explicit precision, from any source (command line, JSON config, code), is the user's and is kept (bf16
    autocast on a CPU is real: `--bf16 true --use_cpu true`). Only when neither `fp16` nor `bf16` was given (both
    None) is it chosen by device: bf16 on GPUs that support it natively (compute capability 8.0+), fp16 on older
    GPUs, fp32 on CPU. Emulated bf16 (what `is_bf16_supported()` also counts on a T4 or V100) is slow: not chosen."""
    on_gpu = torch.cuda.is_available() and not getattr(args, "use_cpu", False)
    if args.fp16 is None and args.bf16 is None:
        args.bf16 = bool(on_gpu and torch.cuda.is_bf16_supported(including_emulation=False))
        args.fp16 = bool(on_gpu and not args.bf16)
        return
    args.fp16, args.bf16 = bool(args.fp16), bool(args.bf16)
    if args.fp16 and not on_gpu:
        logger.warning("--fp16 without a CUDA device: the Trainer does not autocast to fp16 on a CPU (use --bf16)")
    if args.bf16 and not on_gpu and not cpu_has_fast_bf16():
        logger.warning(
            "--bf16 on this CPU (%s, without AVX-512): PyTorch multiplies bf16 matrices in its single-threaded "
            "reference GEMM, 0.4 GFLOPS against fp32's 69 for a Phi-2-size layer's backward on a 2-core AVX2 EPYC "
            "(BENCHMARKS.md \"Real size on one CPU machine\"): train in fp32 here (--bf16 false)",
            torch.backends.cpu.get_cpu_capability())


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 through oneDNN (AVX-512 and newer), torch's own test."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def apply_speed_options(model, training_args) -> torch.nn.Module:
    """The speed options a stage applies to its model itself (`--use_liger_kernel`, as `fused_kernels`);
    `--torch_compile` and `--attn_implementation` go through the Trainer and `from_pretrained` as usual."""
    if training_args.fused_kernels:
        from mmphi.kernels import apply_liger_kernel

        apply_liger_kernel(model, device_is_cuda=torch.cuda.is_available() and not training_args.use_cpu)
    return model


class FP16OverflowGuard(TrainerCallback):
    """Stops an fp16 run at the first non-finite training loss it logs (added by `Stage.run`). float16 ends at 65504,
    and activations past it make the loss NaN/inf: the loss scaler then skips the step, and a model that overflows
    once tends to overflow at every step, so the run would go on without learning. bf16 has fp32's range."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if args.fp16 and loss is not None and not math.isfinite(loss):
            raise FloatingPointError(
                f"step {state.global_step}: the training loss is {loss} in fp16, a float16 overflow. Train with "
                "--bf16 true on a GPU with bf16 (compute capability 8.0+: A100, L4, H100, RTX 30xx and newer), or in "
                "fp32 (--fp16 false)")


@dataclass
class StageOptions:
    """What every stage's training arguments add to HF's: precision chosen by device when unset (and the loss filter
    by precision), and two Trainer flags that the stage ending carries out itself (declared here, set from the flags
    after parsing)."""

    fp16: bool | None = field(default=None, metadata={"help": PRECISION_HELP})
    bf16: bool | None = field(default=None, metadata={"help": PRECISION_HELP})
    logging_nan_inf_filter: bool | None = field(default=None, metadata={
        "help": "log NaN/inf training losses as the mean of the finite ones; default (unset): on, except in fp16, "
                "where a non-finite loss is a float16 overflow and stops the run (`FP16OverflowGuard`)"})
    push_final_to_hub: bool = field(default=False, init=False, metadata={
        "help": "from --push_to_hub: the stage pushes its final folder once, with a card built from the run, "
                "instead of the Trainer's pushes of output_dir at every save"})
    fused_kernels: bool = field(default=False, init=False, metadata={
        "help": "from --use_liger_kernel: the stage applies the fused kernels itself (Liger's patches do not cover "
                "Phi)"})

    def __post_init__(self):
        resolve_precision(self)
        # transformers warns on every run where `gradient_checkpointing` (TRL's and our defaults, or the flag) is set
        # and its new name `activation_checkpointing` is not; taking the value over says the same without the warning
        if self.activation_checkpointing is None:
            self.activation_checkpointing = self.gradient_checkpointing
        if not torch.accelerator.is_available():  # pinned memory needs an accelerator; torch warns at every loader
            self.dataloader_pin_memory = False
        if self.logging_nan_inf_filter is None:  # the filter would log an overflowed fp16 step as a finite loss
            self.logging_nan_inf_filter = not self.fp16
        self.push_final_to_hub, self.push_to_hub = bool(self.push_to_hub), False
        # the Trainer pickles its arguments into every checkpoint (training_args.bin): the push reads HF_TOKEN instead
        if self.hub_token:
            os.environ["HF_TOKEN"], self.hub_token = self.hub_token, None
        self.fused_kernels, self.use_liger_kernel = bool(self.use_liger_kernel), False
        super().__post_init__()


@dataclass
class StageTrainingArguments(StageOptions, TrainingArguments):
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


@dataclass
class BuiltStage:
    """What a stage's `build_trainer(model_args, data_args, training_args)` returns: the trainer, ready for
    `.train()`, with its parts (the demo, benchmarks and tests reach them here, never through private names)."""

    trainer: object
    model: torch.nn.Module
    processor: object = None
    collator: object = None
    train: object = None  # the training samples (projector, instruct: EncodedSamples; pretrain: packed blocks)
    evaluation: object = None
    reports: list[SkipReport] = field(default_factory=list)  # skipped records, read again once training is done
    trainable: list[str] = field(default_factory=list)
    data_metrics: Callable[[], dict] = dict  # what the data did during training (padding, truncation)
    run_info: dict = field(default_factory=dict)  # stage-specific facts for run_info.json


def parse_stage_args(dataclass_types: tuple, argv: list[str] | None = None):
    """The stage's argument dataclasses from the command line; `--config FILE` (YAML or JSON, e.g.
    recipes/tiny/<stage>.yaml) sets defaults that later flags override (TRL's `TrlParser`). A config file given as
    the only argument (HF's example scripts' form) is read the same way."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        argv = ["--config", argv[0]]
    return TrlParser(dataclass_types).parse_args_and_config(args=argv)


def resolve_resume(training_args) -> str | bool | None:
    """`--resume_from_checkpoint latest` (or `true`) means the newest complete checkpoint in output_dir."""
    value = training_args.resume_from_checkpoint
    if isinstance(value, str) and value.lower() in ("latest", "last", "true"):
        last = latest_complete_checkpoint(training_args.output_dir)
        if last is None:
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: no complete checkpoint in "
                                    f"{training_args.output_dir}")
        return last
    if isinstance(value, str) and not os.path.isdir(value):  # before the data is read, not after
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    return value


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` holding `trainer_state.json`, which the Trainer writes after the weights and the
    optimizer: a save cut short (a full disk, a kill) lacks it, and is skipped with a warning naming it."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(int(match.group(1)) for name in os.listdir(output_dir)
                   if (match := re.fullmatch(r"checkpoint-(\d+)", name)))
    for step in reversed(steps):
        path = os.path.join(output_dir, f"checkpoint-{step}")
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            return path
        logger.warning("%s is incomplete (no trainer_state.json): not resumed from", path)
    return None


def train_and_evaluate(stage: BuiltStage, resume_from_checkpoint=None) -> dict:
    """Train, then evaluate; the metrics with the wall time, what the data did during training (read before
    evaluation adds its batches), the trainable size and the skipped records."""
    trainer = stage.trainer
    start = time.perf_counter()
    try:
        metrics = dict(trainer.train(resume_from_checkpoint=resume_from_checkpoint).metrics)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(save_on_interrupt(trainer)) from None
    metrics["train_wall_s"] = round(time.perf_counter() - start, 1)
    if stage.evaluation is not None:
        metrics.update(evaluation_at_last_step(trainer) or trainer.evaluate())
    gather_collator_counts(trainer)  # the collator counts training and evaluation batches apart
    metrics.update(stage.data_metrics())
    metrics["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    metrics["skipped_bad_records"] = warn_skipped(logger, *stage.reports)
    return metrics


def evaluation_at_last_step(trainer) -> dict:
    """The held-out metrics the Trainer logged at the final step when it evaluated there (an `eval_steps` that
    divides the run) and the final weights are that step's (no best checkpoint loaded back): another evaluation would
    repeat them, which costs minutes at real size. {} otherwise. Every process logs, so all agree."""
    if trainer.args.load_best_model_at_end:
        return {}
    logged = {}
    for entry in trainer.state.log_history:
        if entry.get("step") == trainer.state.global_step:
            logged.update({key: value for key, value in entry.items() if key.startswith("eval_")})
    return logged


def save_on_interrupt(trainer) -> str:
    """Ctrl-C during training: a one-process run saves a checkpoint of the optimizer steps done so far, so nothing
    since the last save is lost; says where and how to continue. Several processes are left as they are: a sharded
    save needs every process, which an interrupt cannot promise."""
    step, resume = trainer.state.global_step, "continue with --resume_from_checkpoint latest"
    if step == 0:
        return "before the first optimizer step: nothing to save"
    if trainer.args.world_size > 1:
        return f"at step {step}, {trainer.args.world_size} processes: no checkpoint on interrupt; {resume} (the " \
               "last one saved)"
    folder = os.path.join(trainer.args.output_dir, f"checkpoint-{step}")
    if not os.path.isfile(os.path.join(folder, "trainer_state.json")):
        trainer._save_checkpoint(trainer.model, trial=None)
    return f"at step {step}: saved {folder}; {resume}"


def encoded_data_metrics(collator, train) -> dict:
    """The projector and instruct stages' data during training: the training batches' padding fraction and what
    truncation did."""
    return {"padding_fraction": round(collator.padding_fraction, 4), "truncated": train.truncation.truncated,
            "dropped_too_long": train.truncation.dropped}


def save_final(trainer, output_dir: str) -> None:
    """The stage's final folder: weights (safetensors), config, processor / tokenizer, written for inference. Every
    process takes part (sharded engines gather the weights); the main process writes.

    FSDP: the Trainer's `save_model` writes weights only under FULL_STATE_DICT, and the checkpoints for resume are
    SHARDED_STATE_DICT (scripts/configs/fsdp*.yaml). So every process gathers the full state dict here, whatever the
    checkpoints' type, and the main process saves the model as its own class (`own_class`). DeepSpeed ZeRO-3 gathers
    its 16-bit weights inside `save_model`, which therefore runs on every process; DDP and one process write from the
    main one."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    enable_kv_cache(model)
    if not trainer.is_fsdp_enabled:
        trainer.save_model(output_dir)
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # full tensors, on the main process only
    if trainer.accelerator.is_main_process:
        with own_class(model):
            trainer._save(output_dir, state_dict=state_dict)  # what save_model does under FULL_STATE_DICT
    trainer.accelerator.wait_for_everyone()


@contextlib.contextmanager
def own_class(model):
    """FSDP2's `fully_shard` gives a module a subclass of its class (`FSDPMMPhiForCausalLM`), and `save_pretrained`
    puts the class it sees in config.json's auto_map and copies the file that defines it (torch's `_fsdp_*.py`). While
    the model is written, it shows its own class (`MMPhiForCausalLM`, `PhiForCausalLM`): our code files and auto_map.
    """
    from torch.distributed.fsdp import FSDPModule

    sharded = type(model)
    if isinstance(model, FSDPModule):
        model.__class__ = next(cls for cls in sharded.__mro__ if not issubclass(cls, FSDPModule))
    try:
        yield model
    finally:
        model.__class__ = sharded


def draw_loss_curve(trainer) -> str | None:
    """The run's loss curve beside its record (`loss_curve.png`); None when no loss was logged (a run shorter than
    `--logging_steps`)."""
    if not any("loss" in entry for entry in trainer.state.log_history):
        return None
    from mmphi.plots import plot_trainer_state  # matplotlib only when there is something to plot

    return plot_trainer_state(trainer.args.output_dir)


@dataclass(frozen=True)
class Stage:
    """The one skeleton every stage runs through. A stage module supplies its argument dataclasses and
    `build_trainer`; the skeleton owns the rest: `--validate_data`, resume (`latest`), train, evaluate, skip report,
    the final save, the run record, the loss curve and the push. `finish` (optional) runs on the main process after
    the save and returns the folder to push (the instruct stage's merge)."""

    name: str
    arguments: tuple  # (ModelArguments, DataArguments, training arguments)
    build_trainer: Callable
    validate_data: Callable
    finish: Callable | None = None

    def parse_args(self, argv: list[str] | None = None):
        return parse_stage_args(self.arguments, argv)

    def main(self, argv: list[str] | None = None) -> dict | None:
        """The command line: parse, then either scan the data (`--validate_data`; exits 0 when clean) or train,
        printing the metrics."""
        model_args, data_args, training_args = self.parse_args(argv)
        for flag in ("model_name_or_path", "tokenizer_name", "config_name"):  # before the data is read
            if getattr(model_args, flag, None):
                check_model_path(getattr(model_args, flag))
        if getattr(model_args, "export_llava", None):  # a folder the export may not replace: say so before training
            check_replaceable(model_args.export_llava)
        configure_logging(training_args)
        if data_args.validate_data:
            sys.exit(self.validate_data(data_args))
        return self.run(model_args, data_args, training_args)

    def run(self, model_args, data_args, training_args) -> dict:
        """Train and save output_dir (every process takes part in the save, as sharded engines need); the record,
        loss curve, `finish` and push on the main process. Returns the metrics."""
        training_args.resume_from_checkpoint = resolve_resume(training_args)
        stage = self.build_trainer(model_args, data_args, training_args)
        check_processes_joined(stage.trainer)
        stage.trainer.add_callback(FP16OverflowGuard())
        metrics = train_and_evaluate(stage, training_args.resume_from_checkpoint)
        trainer = stage.trainer
        save_final(trainer, training_args.output_dir)
        if not trainer.is_world_process_zero():
            return metrics
        run_info = describe_run(self.name, model_args, data_args, training_args, **stage.run_info)
        record_run(trainer, metrics, run_info)
        metrics["loss_curve"] = draw_loss_curve(trainer)
        final = training_args.output_dir
        if self.finish is not None:
            final = self.finish(stage, model_args, training_args, metrics, run_info)
        if getattr(model_args, "export_llava", None):
            from mmphi.export import export_llava

            metrics["export_llava"] = export_llava(final, model_args.export_llava)
        logger.info("%s done: the model is in %s; metrics in %s", self.name, final,
                    os.path.join(training_args.output_dir, "all_results.json"))
        push_final(training_args, final)
        return metrics


def check_processes_joined(trainer) -> None:
    """A launcher that started several processes (WORLD_SIZE) whose Trainer sees one process: without a GPU and
    without `--use_cpu true`, accelerate leaves each process training alone, all writing the same output_dir."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and trainer.accelerator.num_processes == 1:
        raise RuntimeError(f"{launched} processes were launched, but each trains alone (no process group): without a "
                           "GPU, pass --use_cpu true to the training script (scripts/configs/cpu_*.yaml)")


class FSDPOnCPUMixin:
    """Trainer mixin of every stage: an FSDP launch on CPU (scripts/configs/cpu_fsdp.yaml) really shards.

    accelerate types a CPU run as MULTI_CPU and switches to FSDP only from GPU-like types, so an FSDP config launched
    with `--use_cpu true` would train as plain data parallel. torch's FSDP2 (`fully_shard`) runs on a CPU mesh with
    gloo; after the Trainer has built its Accelerator, this hands that Accelerator the FSDP plugin that the launch
    configured (the FSDP_* environment, or `--fsdp_config`) and a CPU mesh over every process, as accelerate's own
    FSDP2 set-up does on GPUs. GPU runs and runs that did not ask for FSDP are untouched."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        enable_fsdp_on_cpu(self)


def enable_fsdp_on_cpu(trainer) -> bool:
    """FSDP2 over a CPU mesh for `trainer`'s Accelerator when the launch asked for FSDP and the run is on CPU
    (`FSDPOnCPUMixin`); True when it did."""
    from accelerate import PartialState
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or trainer.args.fsdp_plugin_args
    if not asked or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**(trainer.args.fsdp_plugin_args or {}))
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on CPU needs FSDP2 (fsdp_version: 2, scripts/configs/cpu_fsdp.yaml)")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    # both states, as AcceleratorState does when it switches a GPU launch to FSDP (every new AcceleratorState copies
    # PartialState's type)
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    # every process one shard: the mesh FSDP2 shards over (its `dp_shard_cp` dimension), built on the CPU
    state.parallelism_config = ParallelismConfig(dp_shard_size=state.num_processes)
    state.device_mesh = state.parallelism_config.get_device_mesh("cpu")
    trainer.is_fsdp_enabled = True
    return True


class MMPhiTrainerMixin(FSDPOnCPUMixin):
    """Trainer mixin for the projector and instruct stages: `--train_sampling_strategy group_by_length` takes the
    lengths from the dataset's `length` column (computed while tokenising) instead of loading every sample, images
    included; and the collator counts evaluation batches apart, so the padding fraction is the training batches'."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The Trainer sets the top config's use_cache from its arguments (off for training); the language model reads
        # its own, which would otherwise warn at the first checkpointed step. The final save turns both back on.
        text_config = getattr(self.model.config, "text_config", None)
        if text_config is not None:
            text_config.use_cache = self.args.use_cache

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and "length" in (
                getattr(dataset, "column_names", None) or []):
            return length_grouped_sampler(sample_lengths(dataset), self.args)
        return super()._get_train_sampler(train_dataset)

    def loss_only_inputs(self, inputs: dict, return_outputs: bool) -> dict:
        """The batch for the model's own loss (`Trainer.compute_loss`). A training step needs only the loss, so the
        model scores the labelled positions alone (`skip_logits`): the same loss, without projecting every image and
        prompt token through the LM head (BENCHMARKS.md "Instruct (tiny)"). A caller that returns the outputs
        (`return_outputs`, unless a loss-only evaluation step asked already), label smoothing and a `compute_loss_func`
        read the logits, so they get the batch as it is."""
        if return_outputs or "labels" not in inputs or self.label_smoother is not None \
                or self.compute_loss_func is not None:
            return inputs
        return {**inputs, "skip_logits": True}

    def _prepare_inputs(self, inputs):
        """The counts a DataLoader worker's collator made for this batch go to the trainer's collator, not the
        model."""
        counts = inputs.pop(COLLATED_COUNTS, None) if isinstance(inputs, dict) else None
        if counts is not None:
            self.data_collator.add_counts(counts)
        return super()._prepare_inputs(inputs)

    def evaluate(self, *args, **kwargs):
        self.data_collator.evaluating = True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.data_collator.evaluating = False


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """Each epoch's order from seed + epoch (the Trainer calls `set_epoch`): a run resumed in a later epoch draws that
    epoch's order, not the continuation of a generator that the interrupted run had advanced."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


def length_grouped_sampler(lengths, args) -> EpochSeededLengthGroupedSampler:
    """Length-grouped order that is the same on every process and for every process count: groups are sized by the
    global batch (per-device batch x processes x accumulation) and shuffled by a generator seeded from
    `data_seed`/`seed` plus the epoch. Accelerate then deals the batches of this one order out to the processes."""
    global_batch = args.per_device_train_batch_size * max(1, args.world_size) * args.gradient_accumulation_steps
    seed = args.data_seed if args.data_seed is not None else args.seed
    return EpochSeededLengthGroupedSampler(global_batch, list(lengths), seed)


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
    if not training_args.push_final_to_hub:
        return None
    from mmphi import hub

    repo_id = training_args.hub_model_id or os.path.basename(os.path.normpath(training_args.output_dir))
    argv = ["--model", folder, "--repo_id", repo_id, "--commit_message", f"Upload {os.path.basename(folder)}"]
    argv += ["--private"] if training_args.hub_private_repo else []
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
    quiet_library_notices()
    if not training_args.should_log:  # libraries too: a replica repeats the main process's progress and notes
        transformers.utils.logging.set_verbosity(max(level, logging.WARNING))
        datasets.utils.logging.set_verbosity(max(level, logging.WARNING))
        datasets.utils.logging.disable_progress_bar()
