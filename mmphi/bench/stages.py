"""Benchmark harness: one training step of each stage, through the stage's own Trainer and through a bare PyTorch
loop on the same model and the same batch, measured in the same run.

    python benchmarks/benchmark.py --device cpu                  # tiny sizes; appends a table to BENCHMARKS.md
    python benchmarks/benchmark.py --device cuda --size real     # Phi-2 2.7B / TinyCLIP sizes (benchmarks/gpu_check.sh)
    python benchmarks/benchmark.py --estimate                    # the GPU memory ESTIMATE for the goals (no run)

Stages (random weights, synthetic token ids; nothing from the Hub):
- pretrain: `PhiForCausalLM` from scratch with scripts/pretrain_phi2.py's training arguments (paged 8-bit AdamW,
  gradient checkpointing, bf16 on GPU) and its block collator; tiny: the `tiny` preset, block 128, batch 8;
  real: Phi-2, block 2048, micro-batch 4.
- projector: scripts/train_projector.py's model loading and freezing, from cached tower features (its recipe's
  `--cache_vision_features`): tiny MM-Phi batch 8 x 80 tokens / TinyCLIP + Phi-2 batch 32 x 128 tokens.
- instruct: scripts/finetune_instruct.py's 4-bit language model + LoRA (+ projector) through its SFTTrainer
  subclass, images read from JPEG files by its collator: tiny batch 4 x 128, LoRA r=16 / real batch 4 x 2048, r=64.

For each: samples/s, tokens/s (image tokens included), median step time, peak memory (CUDA max_memory_allocated; on
CPU the process's peak RSS, reset before each phase through /proc/self/clear_refs), MFU on GPU, and the overhead
ratio Trainer step / bare step. A Trainer step here is everything between two optimizer steps (data loading and
collation, forward, backward, clipping, optimizer, scheduler, logging); the bare loop runs forward, backward,
gradient clipping and the same optimizer class on a batch already on the device.

MFU counts model FLOPs (no recompute): per token 2 per weight for a forward matmul, 4 when the gradient must also
flow to the input through a frozen weight, 6 for a trained weight, plus the attention scores 12 * layers * hidden *
seq (PaLM's 6N + 12LHQT for pretraining); the vision tower, run forward only, costs 2 per weight per patch token.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from configuration_mmphi import PHI2_TEXT_CONFIG, TINY_TEXT_CONFIG, TINY_VISION_CONFIG, TINYCLIP_VISION_CONFIG
from mmphi.recipes import BENCHMARK_SIZES as SIZES

logger = logging.getLogger("benchmark")

STAGES = ("pretrain", "projector", "instruct")
GIB = 1024**3
# Dense bf16 peak of the card (spec sheet), for MFU. Override with --peak_tflops.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.0,
               "A10G": 125.0, "L4": 121.0}
SECTION = "## Benchmark harness"


# ---------------------------------------------------------------------------------------------------- measuring


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
    tokens_per_sample: int
    trainable_parameters: int
    total_parameters: int
    model_flops_per_sample: float
    precision: str
    optimizer: str
    trainer: dict = field(default_factory=dict)
    bare: dict = field(default_factory=dict)
    overhead_ratio: float | None = None
    notes: str = ""


def summarize(phase: PhaseResult, batch: int, tokens_per_sample: int, flops_per_sample: float,
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


# -------------------------------------------------------------------------------------------------------- FLOPs


def linear_weights(module: nn.Module, trainable: bool | None = None) -> int:
    """Weights of the matmuls under `module` (in x out per nn.Linear, 4-bit ones included: their packed storage
    hides the count), optionally only trained (True) or frozen (False) ones."""
    total = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear) and (trainable is None or sub.weight.requires_grad == trainable):
            total += sub.in_features * sub.out_features
    return total


def attention_flops_per_token(config, seq: int) -> float:
    """QK^T and AV (2 * 2 * seq * hidden per layer forward), backward twice that: PaLM's 12 * L * H * T."""
    return 12.0 * config.num_hidden_layers * config.hidden_size * seq


def vision_forward_flops_per_image(vision_config, tower: nn.Module) -> float:
    patches = (vision_config.image_size // vision_config.patch_size) ** 2 + 1  # + CLS
    attention = 4.0 * vision_config.num_hidden_layers * vision_config.hidden_size * patches
    return patches * (2.0 * linear_weights(tower) + attention)


# -------------------------------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """A stage ready to measure: a Trainer (built lazily: it owns the model setup), rows for its dataset, and the
    collated batch for the bare loop."""

    stage: str
    seq: int
    batch: int
    tokens_per_sample: int
    build_trainer: object  # (output_dir, max_steps) -> Trainer
    flops_per_sample: object  # (model) -> float
    notes: str = ""


def random_ids(rows: int, length: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(low, high, (rows, length), generator=generator)


def training_overrides(device: str, batch: int, max_steps: int, output_dir: str) -> dict:
    """What every measured Trainer run shares, on top of the stage's own defaults."""
    return dict(output_dir=output_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                max_steps=max_steps, eval_strategy="no", save_strategy="no", report_to="none", logging_steps=10,
                disable_tqdm=True, use_cpu=device == "cpu", seed=0, dataloader_num_workers=0 if device == "cpu" else 4,
                warmup_steps=0)


def pretrain_workload(size: str, device: str, generator: torch.Generator) -> Workload:
    from transformers import PhiConfig, PhiForCausalLM, Trainer

    from mmphi.data.corpus import collate_blocks
    from mmphi.stages.pretrain import PretrainTrainingArguments

    batch, seq = SIZES[size]["pretrain"]["batch"], SIZES[size]["pretrain"]["seq"]
    config = PhiConfig(**(PHI2_TEXT_CONFIG if size == "real" else TINY_TEXT_CONFIG))
    config._attn_implementation = "sdpa"
    rows = [{"input_ids": ids.tolist()} for ids in random_ids(batch, seq, 0, config.vocab_size, generator)]

    def build_trainer(output_dir: str, max_steps: int):
        args = PretrainTrainingArguments(**training_overrides(device, batch, max_steps, output_dir))
        with torch.device("cuda" if device == "cuda" else "cpu"):
            model = PhiForCausalLM(config)  # fp32 master weights, as stage 0 builds it
        return Trainer(model=model, args=args, train_dataset=rows, data_collator=collate_blocks)

    def flops_per_sample(model) -> float:
        return seq * (6.0 * linear_weights(model) + attention_flops_per_token(config, seq))

    return Workload("pretrain", seq, batch, seq, build_trainer, flops_per_sample)


def build_random_mmphi(size: str, folder: str, device: str) -> str:
    """A random-init MM-Phi saved like build_model.py saves one (TinyCLIP + Phi-2 shapes, or the tiny default)."""
    from transformers import CLIPVisionConfig, PhiConfig

    from configuration_mmphi import MMPhiConfig
    from modeling_mmphi import MMPhiForCausalLM

    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    if size == "real":
        config = MMPhiConfig(vision_config=CLIPVisionConfig(**TINYCLIP_VISION_CONFIG),
                             text_config=PhiConfig(**PHI2_TEXT_CONFIG), image_token_index=4000)
    else:
        config = MMPhiConfig(vision_config=CLIPVisionConfig(**TINY_VISION_CONFIG),
                             text_config=PhiConfig(**TINY_TEXT_CONFIG), image_token_index=4000)
    config.text_config.pad_token_id = 4001
    torch.manual_seed(0)
    with torch.device("cuda" if device == "cuda" else "cpu"):
        model = MMPhiForCausalLM(config)
    if device == "cuda":
        model = model.to(torch.bfloat16)  # what a pretrained checkpoint holds; the stages cast what they train
    partial = folder + ".partial"  # renamed when complete: a run killed mid-save leaves no half folder behind
    model.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    del model
    free_memory(device)
    return folder


def multimodal_rows(config, batch: int, seq: int, generator: torch.Generator, prompt: int = 8) -> list[dict]:
    """[prompt][image tokens][answer]: loss on the answer only, as the chat template's masks give."""
    image = config.image_seq_length
    answer = seq - prompt - image
    if answer < 1:
        raise ValueError(f"seq {seq} leaves no answer tokens after {prompt} prompt and {image} image tokens")
    rows = []
    for _ in range(batch):
        ids = torch.cat([random_ids(1, prompt, 5, 3900, generator)[0],
                         torch.full((image,), config.image_token_index),
                         random_ids(1, answer, 5, 3900, generator)[0]]).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (prompt + image) + ids[prompt + image:]})
    return rows


def projector_workload(size: str, device: str, generator: torch.Generator, model_folder: str) -> Workload:
    from transformers import AutoConfig, Trainer

    from mmphi.data import MMPhiDataCollator
    from mmphi.stages.projector import ModelArguments, ProjectorTrainingArguments, freeze_for_stage1, load_model

    batch, seq = SIZES[size]["projector"]["batch"], SIZES[size]["projector"]["seq"]
    config = AutoConfig.from_pretrained(model_folder, trust_remote_code=True)
    rows = multimodal_rows(config, batch, seq, generator)
    feature_dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the frozen tower's output dtype
    for row in rows:  # cached tower features, as --cache_vision_features stores them
        row["vision_features"] = torch.randn(config.image_seq_length, config.vision_config.hidden_size,
                                             generator=generator).to(feature_dtype)

    def build_trainer(output_dir: str, max_steps: int):
        args = ProjectorTrainingArguments(**training_overrides(device, batch, max_steps, output_dir))
        model = load_model(ModelArguments(model_name_or_path=model_folder), args)
        freeze_for_stage1(model)
        collator = MMPhiDataCollator(pad_token_id=config.text_config.pad_token_id)
        return Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)

    def flops_per_sample(model) -> float:
        text = model.config.text_config
        language = model.model.language_model
        per_token = 4.0 * (linear_weights(language) + linear_weights(model.lm_head)) + attention_flops_per_token(
            text, seq)
        projector = 6.0 * linear_weights(model.model.multi_modal_projector) * config.image_seq_length
        return seq * per_token + projector

    return Workload("projector", seq, batch, seq, build_trainer, flops_per_sample,
                    notes="cached tower features (the recipe's --cache_vision_features)")


def write_images(folder: str, count: int, generator: torch.Generator) -> list[str]:
    """COCO-sized (640 x 480) smooth random JPEGs: the collator decodes and preprocesses them every step."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for index in range(count):
        small = torch.randint(0, 256, (12, 16, 3), generator=generator, dtype=torch.uint8).numpy()
        image = Image.fromarray(np.asarray(small)).resize((640, 480), Image.BILINEAR)
        path = os.path.join(folder, f"{index:04d}.jpg")
        image.save(path, quality=90)
        paths.append(path)
    return paths


def instruct_workload(size: str, device: str, generator: torch.Generator, model_folder: str,
                      work_dir: str) -> Workload:
    import datasets
    from transformers import AutoConfig

    from mmphi.build import tiny_image_processor, tiny_tokenizer
    from mmphi.stages.instruct import (
        ImageLoadingCollator,
        InstructSFTConfig,
        InstructTrainer,
        ModelArguments,
        keep_trainable_in_fp32,
        load_model,
        lora_config,
    )
    from processing_mmphi import MMPhiProcessor

    settings = SIZES[size]["instruct"]
    batch, seq = settings["batch"], settings["seq"]
    config = AutoConfig.from_pretrained(model_folder, trust_remote_code=True)
    rows = multimodal_rows(config, batch, seq, generator)
    images = write_images(os.path.join(work_dir, "images"), batch, generator)
    dataset = datasets.Dataset.from_dict({
        "input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows], "image": images,
        "location": [f"benchmark row {i}" for i in range(batch)], "length": [seq] * batch,
    })
    # Only the image processor and the pad token matter here (the token ids are synthetic).
    processor = MMPhiProcessor(image_processor=tiny_image_processor(config.vision_config.image_size),
                               tokenizer=tiny_tokenizer(), image_seq_length=config.image_seq_length)
    model_args = ModelArguments(model_name_or_path=model_folder, lora_r=settings["lora_r"])

    def build_trainer(output_dir: str, max_steps: int):
        args = InstructSFTConfig(max_length=seq, **training_overrides(device, batch, max_steps, output_dir))
        model = load_model(model_args, args)
        trainer = InstructTrainer(model=model, args=args, train_dataset=dataset,
                                  data_collator=ImageLoadingCollator(processor), processing_class=processor,
                                  peft_config=lora_config(model_args))
        keep_trainable_in_fp32(trainer.model, args)
        return trainer

    def flops_per_sample(model) -> float:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        text, vision = base.config.text_config, base.config.vision_config
        language = base.model.language_model
        frozen = linear_weights(language, trainable=False) + linear_weights(base.lm_head)
        lora = linear_weights(language, trainable=True)
        per_token = 4.0 * frozen + 6.0 * lora + attention_flops_per_token(text, seq)
        projector = 6.0 * linear_weights(base.model.multi_modal_projector) * config.image_seq_length
        return seq * per_token + projector + vision_forward_flops_per_image(vision, base.model.vision_tower)

    return Workload("instruct", seq, batch, seq, build_trainer, flops_per_sample,
                    notes=f"4-bit LM + LoRA r={settings['lora_r']}; images decoded from JPEG each step")


# ------------------------------------------------------------------------------------------------------ phases


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


def bare_loop_phase(trainer, device: str, warmup: int, steps: int) -> PhaseResult:
    """The same model (as the Trainer left it: frozen parts, LoRA, checkpointing, dtypes) and the same collated
    batch, trained by hand with the Trainer's optimizer class and kwargs."""
    from transformers import Trainer

    model, args = trainer.model, trainer.args
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.per_device_train_batch_size)])
    batch = {key: value.to(args.device) for key, value in batch.items()}
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
    flops = workload.flops_per_sample(model)
    args = trainer.args
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    logger.info("%s: bare loop phase", workload.stage)
    bare_phase = bare_loop_phase(trainer, device, warmup, steps)
    result = StageResult(
        stage=workload.stage, size=size, device=device, batch=workload.batch, seq=workload.seq,
        tokens_per_sample=workload.tokens_per_sample, trainable_parameters=n_trainable, total_parameters=n_total,
        model_flops_per_sample=flops, precision=precision, optimizer=getattr(args.optim, "value", str(args.optim)),
        trainer=summarize(trainer_phase, workload.batch, workload.tokens_per_sample, flops, peak_flops),
        bare=summarize(bare_phase, workload.batch, workload.tokens_per_sample, flops, peak_flops),
        overhead_ratio=trainer_phase.median_step / bare_phase.median_step, notes=workload.notes,
    )
    del trainer, model
    free_memory(device)
    return result


# --------------------------------------------------------------------------------------------------- reporting


def machine_description(device: str) -> str:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / GIB:.0f} GiB), torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = re.search(r"model name\s*:\s*(.+)", handle.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    return f"{os.cpu_count()}-core CPU ({model}), no GPU, torch {torch.__version__}"


def peak_tflops_for(device: str, override: float | None) -> float | None:
    if override:
        return override
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return value
    logger.warning("unknown peak FLOP/s for %s: pass --peak_tflops for MFU", name)
    return None


def format_memory(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"


def table(results: list[StageResult], with_mfu: bool) -> str:
    header = ["stage", "batch x seq", "trainable / total params", "loop", "step (median)", "samples/s", "tokens/s",
              "peak memory"] + (["card memory used", "MFU"] if with_mfu else []) + ["Trainer / bare"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        for loop, phase in (("Trainer", r.trainer), ("bare", r.bare)):
            cells = [r.stage if loop == "Trainer" else "", f"{r.batch} x {r.seq}" if loop == "Trainer" else "",
                     f"{r.trainable_parameters / 1e6:.2f}M / {r.total_parameters / 1e6:.1f}M"
                     if loop == "Trainer" else "", loop,
                     f"{phase['median_step_s'] * 1000:.0f} ms", f"{phase['samples_per_second']:.2f}",
                     f"{phase['tokens_per_second']:.0f}", format_memory(phase["peak_memory_gib"])]
            if with_mfu:
                cells.append(format_memory(phase["peak_device_used_gib"]))
                cells.append(f"{phase['mfu'] * 100:.1f}%" if phase.get("mfu") is not None else "-")
            cells.append(f"**{r.overhead_ratio:.2f}x**" if loop == "Trainer" else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_run(report: dict) -> str:
    results = [StageResult(**r) for r in report["results"]]
    with_mfu = report["device"] == "cuda"
    memory_kind = ("torch.cuda.max_memory_allocated; card memory used = max over steps of total - free "
                   "(includes the CUDA context, torch's cache and paged optimizer states)" if with_mfu
                   else "peak RSS of the process (weights included)")
    lines = [
        f"### {report['date']}: `{report['command']}`",
        "",
        f"Machine: {report['machine']}. Load average before/after: {report['load_average_before']} / "
        f"{report['load_average_after']}. {report['threads']} torch thread(s). "
        f"Precision {results[0].precision if results else '-'}; "
        f"{report['warmup']} warm-up + {report['steps']} measured steps per loop; peak memory = {memory_kind}.",
        "",
        table(results, with_mfu),
        "",
    ]
    for r in results:
        if r.notes:
            lines.append(f"- {r.stage}: {r.notes}; optimizer {r.optimizer}; "
                         f"model FLOPs per sample {r.model_flops_per_sample:.3g}.")
    if report.get("errors"):
        lines += [f"- {stage}: FAILED: {error}" for stage, error in report["errors"].items()]
    return "\n".join(lines) + "\n"


def append_to_markdown(path: str, block: str) -> None:
    """Add the run at the end of this harness's section (created if missing), before any later section."""
    text = "# Benchmarks\n"
    if os.path.exists(path):
        with open(path) as handle:
            text = handle.read()
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n`python benchmarks/benchmark.py` runs, newest last.\n"
    start = text.index(SECTION)
    next_section = text.find("\n## ", start + len(SECTION))
    end = len(text) if next_section == -1 else next_section + 1
    section = text[start:end].rstrip("\n") + "\n\n" + block
    text = text[:start] + section + ("\n" + text[end:] if next_section != -1 else "")
    with open(path, "w") as handle:
        handle.write(text)


# ------------------------------------------------------------------------------------------------------ estimate


def estimate(micro_batch: int = 4, seq: int = 2048, lora_r: int = 64) -> dict:
    """GPU memory ESTIMATE for the two real-size goals, in GiB, from parameter, optimizer and activation sizes
    (b = micro-batch, s = sequence, h = hidden, L = layers, V = vocabulary; formulas in BENCHMARKS.md)."""
    h, layers, inter, vocab = (PHI2_TEXT_CONFIG[k] for k in
                               ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
    layer_matmuls = 4 * h * h + 2 * h * inter  # q, k, v, dense, fc1, fc2
    layer_params = layer_matmuls + 4 * h + inter + h + 2 * h  # + biases and the layer norm
    n = layers * layer_params + vocab * h + vocab * h + vocab + 2 * h  # + embeddings, lm_head (+ bias), final norm
    tokens = micro_batch * seq
    # Both stages: gradient checkpointing keeps each layer's input (fp32 residual stream: fp32 embeddings under
    # autocast), recomputes one layer at a time (~ 8h + 6 x intermediate bf16 values per token, about as much again
    # for their gradients), and the loss sees the full logits (bf16 output, fp32 upcast, fp32 gradient).
    activations = {
        "checkpointed_layer_inputs": layers * tokens * h * 4,
        "one_layer_recompute": 2 * tokens * (8 * h + 6 * inter) * 2,
        "logits_and_loss": tokens * vocab * (2 + 4 + 4),
    }
    stage0 = {  # fp32 master weights and gradients, 8-bit AdamW: 2 bytes + a fp32 absmax per 2048 values per state
        "weights_fp32": 4 * n, "gradients_fp32": 4 * n, "adamw_8bit_states": 2 * n + 2 * 4 * n / 2048, **activations,
    }
    lora = layers * lora_r * (4 * (h + h) + (h + inter) + (inter + h))
    tower = 12 * (4 * 640 * 640 + 2 * 640 * 2560)  # TinyCLIP-61M/32 vision encoder matmuls
    stage2 = {  # nf4 + double quantization (~0.5 + 0.127/8 bytes per weight); prepare_model_for_kbit_training casts
        # the other weights (embeddings, lm_head, tower) to fp32; LoRA and projector: fp32 + grads + 8-bit AdamW
        "weights_4bit": layers * layer_matmuls * (0.5 + 0.127 / 8),
        "embeddings_lm_head_tower_fp32": 4 * (2 * vocab * h + tower),
        "lora_and_projector_trained": (lora + 640 * h) * (4 + 4 + 2),
        **activations,
    }
    to_gib = lambda parts: {**{k: v / GIB for k, v in parts.items()}, "total": sum(parts.values()) / GIB}  # noqa: E731
    return {
        "kind": "ESTIMATE (computed, not measured)",
        "micro_batch": micro_batch, "seq": seq, "lora_r": lora_r,
        "phi2_parameters": n, "lora_parameters": lora,
        "stage0_gib": to_gib(stage0),
        "stage2_gib": to_gib(stage2),
    }


def goal_verdicts(paths: list[str]) -> dict:
    """The issue's real-size goals against measured Trainer runs (GiB = 2**30 bytes), next to the estimate."""
    measured = {}
    for path in paths:
        with open(path) as handle:
            report = json.load(handle)
        for result in report["results"]:
            measured[result["stage"]] = {"machine": report["machine"], "size": report["size"], **result["trainer"],
                                         "batch": result["batch"], "seq": result["seq"]}
    verdicts: dict = {"estimate": estimate()}
    if any(run_["size"] != "real" for run_ in measured.values()):
        verdicts["note"] = "not a real-size run: the verdicts say nothing about the goals"
    if "pretrain" in measured:
        run_ = measured["pretrain"]
        verdicts["pretrain"] = {
            "goal": "Phi-2 2.7B, block 2048, micro-batch >= 4, fits in 40 GB; MFU >= 40% on an H100",
            "measured": {k: run_[k] for k in ("machine", "size", "batch", "seq", "peak_memory_gib",
                                             "peak_device_used_gib", "tokens_per_second", "mfu") if k in run_},
            "fits_40gib": max(run_["peak_memory_gib"], run_["peak_device_used_gib"]) <= 40,
            "mfu_at_least_40pct": (run_.get("mfu") or 0) >= 0.40,
        }
    if "instruct" in measured:
        run_ = measured["instruct"]
        verdicts["instruct"] = {
            "goal": "stage 2 QLoRA peak <= 16 GB at max_length 2048, micro-batch 4",
            "measured": {k: run_[k] for k in ("machine", "size", "batch", "seq", "peak_memory_gib",
                                             "peak_device_used_gib", "tokens_per_second", "mfu") if k in run_},
            "peak_allocated_at_most_16gib": run_["peak_memory_gib"] <= 16,
            "card_used_at_most_16gib": run_["peak_device_used_gib"] <= 16,
        }
    return verdicts


# ----------------------------------------------------------------------------------------------------------- run


def run(args) -> dict:
    device = args.device
    size = args.size or ("real" if device == "cuda" else "tiny")
    peak_tflops = peak_tflops_for(device, args.peak_tflops)
    peak_flops = peak_tflops * 1e12 if peak_tflops else None
    work_dir = tempfile.mkdtemp(prefix="mmphi-bench-", dir=args.work_dir)
    generator = torch.Generator().manual_seed(0)
    report = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine_description(device),
              "device": device, "size": size, "command": "python benchmarks/benchmark.py " + " ".join(args.argv),
              "warmup": args.warmup, "steps": args.steps, "peak_tflops": peak_tflops,
              "threads": torch.get_num_threads(),
              "load_average_before": [round(x, 2) for x in os.getloadavg()], "results": [], "errors": {}}
    try:
        for stage in args.stages:
            start = time.perf_counter()
            try:
                workload = make_workload(stage, size, device, generator, work_dir, args.model_dir)
                result = measure_stage(workload, size, device, args.warmup, args.steps,
                                       os.path.join(work_dir, stage), peak_flops)
                report["results"].append(asdict(result))
                logger.info("%s done in %.0f s", stage, time.perf_counter() - start)
            except Exception as error:  # one stage failing (e.g. out of memory) must not lose the others
                if not args.keep_going:
                    raise
                logger.exception("%s failed", stage)
                report["errors"][stage] = f"{type(error).__name__}: {error}"[:500]
            free_memory(device)
            if args.json:  # written after every stage: a time-limited run keeps what it measured
                write_json(args.json, report)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return report


def make_workload(stage: str, size: str, device: str, generator: torch.Generator, work_dir: str,
                  model_dir: str | None = None) -> Workload:
    if stage == "pretrain":
        return pretrain_workload(size, device, generator)
    model_folder = build_random_mmphi(size, model_dir or os.path.join(work_dir, f"mmphi-{size}"), device)
    if stage == "projector":
        return projector_workload(size, device, generator, model_folder)
    return instruct_workload(size, device, generator, model_folder, os.path.join(work_dir, stage))


def write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), help="default: real on cuda, tiny on cpu")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured steps per loop (cpu 2, cuda 3)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per loop (cpu 5, cuda 8)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the card's dense bf16 peak, for MFU")
    parser.add_argument("--json", help="write the results here too (after every stage)")
    parser.add_argument("--markdown", default="BENCHMARKS.md")
    parser.add_argument("--no_markdown", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--keep_going", action="store_true", help="record a failing stage and go on to the next")
    parser.add_argument("--work_dir", default=None, help="where the temporary model/images go (default: /tmp)")
    parser.add_argument("--model_dir", default=None,
                        help="keep the random MM-Phi folder here and reuse it (one process per stage shares it)")
    parser.add_argument("--goals", nargs="+", metavar="JSON",
                        help="read --json reports of real-size runs and print the goal verdicts, then exit")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default on cpu: 1; a shared machine makes multi-thread timings erratic)")
    parser.add_argument("--estimate", action="store_true", help="print the GPU memory ESTIMATE and exit")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    args.warmup = args.warmup if args.warmup is not None else (3 if args.device == "cuda" else 2)
    args.steps = args.steps if args.steps is not None else (8 if args.device == "cuda" else 5)
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.warmup < 1 or args.steps < 2:
        parser.error("need --warmup >= 1 and --steps >= 2")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.estimate or args.goals:
        result = goal_verdicts(args.goals) if args.goals else estimate()
        print(json.dumps(result, indent=1))
        if args.json:
            write_json(args.json, result)
        return result
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    block = markdown_run(report)
    print(block)
    if args.json:
        write_json(args.json, report)
    if not args.no_markdown:
        append_to_markdown(args.markdown, block)
        logger.info("appended to %s", args.markdown)
    return report


if __name__ == "__main__":
    main()
