"""Measuring a stage: peak memory (CUDA allocator or the process's RSS), step times through the Trainer and through
a bare PyTorch loop on the same model and batch, and the per-phase summary."""

from __future__ import annotations

import gc
import logging
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

GIB = 1024**3


@dataclass
class Workload:
    """A stage ready to measure: how to build its Trainer (lazily: the stage's build_trainer owns the model setup)
    and how many model FLOPs one sample of a given length costs."""

    stage: str
    seq: int  # the length every sample is cut at
    batch: int
    build_trainer: Callable[[str, int], object]  # (output_dir, max_steps) -> Trainer
    flops_per_sample: Callable[[nn.Module, int], float]  # (model, the sample's tokens) -> model FLOPs
    notes: str = ""


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(r"VmHWM:\s+(\d+)", handle.read()).group(1)) * 1024


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux >= 4.0: "5" resets the peak resident set size to the current one
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        logger.warning("cannot reset the peak RSS: CPU peaks are the process's lifetime peaks")


def peak_memory(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()


def device_memory_used(device: str) -> int:
    """Memory in use on the whole card (CUDA context, torch's cache, and bitsandbytes' paged optimizer states, which
    live in managed memory that max_memory_allocated never sees); 0 on CPU."""
    if device != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info()
    return total - free


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def reset_bitsandbytes_overrides() -> None:
    """bitsandbytes keeps the Trainer's per-parameter optimizer overrides (32-bit states for embeddings) in a
    process-wide singleton keyed by parameter position: clear it so one stage's overrides don't reach the next."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    bnb.optim.GlobalOptimManager.get_instance().initialize()


@dataclass
class PhaseResult:
    """One way of running the step (Trainer or bare loop) on one stage."""

    step_seconds: list[float]
    peak_memory_bytes: int
    loss: float | None
    peak_device_used_bytes: int = 0

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_seconds)


@dataclass
class StageResult:
    stage: str
    size: str
    device: str
    batch: int
    seq: int
    tokens_per_sample: float
    trainable_parameters: int
    total_parameters: int
    model_flops_per_sample: float
    precision: str
    optimizer: str
    trainer: dict = field(default_factory=dict)
    bare: dict = field(default_factory=dict)
    overhead_ratio: float | None = None
    notes: str = ""


def summarize(phase: PhaseResult, batch: int, tokens_per_sample: float, flops_per_sample: float,
              peak_flops: float | None) -> dict:
    step = phase.median_step
    samples_per_second = batch / step
    summary = {
        "median_step_s": step,
        "step_s": phase.step_seconds,
        "samples_per_second": samples_per_second,
        "tokens_per_second": samples_per_second * tokens_per_sample,
        "peak_memory_gib": phase.peak_memory_bytes / GIB,
        "peak_device_used_gib": phase.peak_device_used_bytes / GIB,
        "loss": phase.loss,
    }
    if peak_flops:
        summary["mfu"] = samples_per_second * flops_per_sample / peak_flops
    return summary


class StepTimer:
    """A TrainerCallback that stamps the end of every optimizer step (after a device sync)."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                synchronize(timer.device)
                timer.stamps.append(time.perf_counter())
                timer.device_used = max(timer.device_used, device_memory_used(timer.device))

        self.device = device
        self.stamps: list[float] = []
        self.device_used = 0
        self.callback = Callback()


def run_trainer_phase(workload: Workload, device: str, warmup: int, steps: int, output_dir: str):
    """Returns (PhaseResult, trainer); the caller frees the trainer's optimizer before the bare phase."""
    reset_bitsandbytes_overrides()
    trainer = workload.build_trainer(output_dir, warmup + steps)
    timer = StepTimer(device)
    trainer.add_callback(timer.callback)
    reset_peak_memory(device)
    synchronize(device)
    output = trainer.train()
    peak = peak_memory(device)
    stamps = timer.stamps[warmup - 1:] if warmup else timer.stamps
    step_seconds = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return PhaseResult(step_seconds, peak, output.training_loss, timer.device_used), trainer  # mean over the run


def training_batch(trainer) -> dict[str, torch.Tensor]:
    """One batch as the Trainer builds it (its dataset rows through its collator), on the training device."""
    rows = [trainer.train_dataset[i] for i in range(trainer.args.per_device_train_batch_size)]
    return {key: value.to(trainer.args.device) for key, value in trainer.data_collator(rows).items()}


def sample_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Tokens of each sample (image tokens included, padding not): what tokens/s and the FLOPs count."""
    input_ids = batch["input_ids"]
    if "attention_mask" not in batch:  # pretrain's packed blocks are all full
        return [input_ids.shape[1]] * input_ids.shape[0]
    return batch["attention_mask"].sum(dim=1).tolist()


def bare_loop_phase(trainer, batch: dict[str, torch.Tensor], device: str, warmup: int, steps: int) -> PhaseResult:
    """The same model (as the Trainer left it: frozen parts, LoRA, checkpointing, dtypes) and the same collated
    batch, trained by hand with the Trainer's optimizer class and kwargs."""
    from transformers import Trainer

    model, args = trainer.model, trainer.args
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    trainer.accelerator.free_memory()  # drop the Trainer's optimizer state before ours is allocated
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.callback_handler.optimizer = trainer.callback_handler.lr_scheduler = None
    for param in model.parameters():
        param.grad = None
    free_memory(device)

    reset_bitsandbytes_overrides()
    register_embedding_overrides(model, args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_cls([{"params": params, "weight_decay": args.weight_decay}], **optimizer_kwargs)
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    scaler = torch.amp.GradScaler(device) if args.fp16 else None
    model.train()
    reset_peak_memory(device)
    times, loss, device_used = [], None, 0
    for _ in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device_type=args.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(**batch).loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
        device_used = max(device_used, device_memory_used(device))
    peak = peak_memory(device)
    del optimizer
    return PhaseResult(times[warmup:], peak, float(loss.detach()), device_used)


def register_embedding_overrides(model, args) -> None:
    """The Trainer keeps 32-bit optimizer states for embeddings under bitsandbytes' 8-bit optimizers; so do we."""
    if "8bit" not in args.optim:
        return
    import bitsandbytes as bnb

    manager = bnb.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})


def measure_stage(workload: Workload, size: str, device: str, warmup: int, steps: int, work_dir: str,
                  peak_flops: float | None) -> StageResult:
    logger.info("%s: Trainer phase", workload.stage)
    trainer_phase, trainer = run_trainer_phase(workload, device, warmup, steps, os.path.join(work_dir, "trainer"))
    model = trainer.model
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    batch = training_batch(trainer)
    lengths = sample_lengths(batch)  # counted in the batch that runs, not taken from the workload's intent
    tokens_per_sample = statistics.mean(lengths)
    flops = statistics.mean(workload.flops_per_sample(model, length) for length in lengths)
    args = trainer.args
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    logger.info("%s: bare loop phase", workload.stage)
    bare_phase = bare_loop_phase(trainer, batch, device, warmup, steps)
    result = StageResult(
        stage=workload.stage, size=size, device=device, batch=len(lengths), seq=batch["input_ids"].shape[1],
        tokens_per_sample=tokens_per_sample, trainable_parameters=n_trainable, total_parameters=n_total,
        model_flops_per_sample=flops, precision=precision, optimizer=getattr(args.optim, "value", str(args.optim)),
        trainer=summarize(trainer_phase, len(lengths), tokens_per_sample, flops, peak_flops),
        bare=summarize(bare_phase, len(lengths), tokens_per_sample, flops, peak_flops),
        overhead_ratio=trainer_phase.median_step / bare_phase.median_step, notes=workload.notes,
    )
    del trainer, model, batch
    free_memory(device)
    return result
