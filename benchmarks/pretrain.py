"""Pretrain-stage benchmark.

1. `quality`: train the tiny recipe (mmphi.stages.pretrain) on the demo corpus for a fixed token budget; report
   tokens/s and held-out perplexity next to a unigram model of the same training split (add-one smoothed token
   frequencies), scored on exactly the same held-out targets.
2. `memory`: the memory plan of the real 2.7B Phi-2 on one 40 GB GPU: measured (random init, synthetic tokens, a few
   steps, `torch.cuda.max_memory_allocated`, tokens/s, MFU) when CUDA is present, otherwise computed from the
   parameter count and activation formulas and printed as an ESTIMATE.

Usage:
    python -m benchmarks.pretrain quality --output_dir outputs/bench_pretrain --max_steps 300
    python -m benchmarks.pretrain memory                       # estimate (no GPU) or measurement (GPU)
    python -m benchmarks.pretrain memory --measure --micro_batch 4 --block_size 2048   # on the GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

GIB = 1024**3
# `quality` scores the model on every held-out block, as the unigram baseline is: a cap far above the demo corpus's
# held-out split (909 blocks of 128 tokens), checked after the run.
ALL_EVAL_BLOCKS = 100_000


# ---------------------------------------------------------------------------------------------------- quality

def unigram_perplexity(train_blocks: list[list[int]], eval_blocks: list[list[int]], vocab_size: int) -> float:
    """Perplexity of add-one smoothed training-token frequencies on the held-out targets the LM is scored on
    (every token of a block but the first, which the LM never predicts)."""
    counts = np.bincount(np.asarray(train_blocks, dtype=np.int64).ravel(), minlength=vocab_size) + 1.0
    log_probs = np.log(counts / counts.sum())
    targets = np.asarray(eval_blocks, dtype=np.int64)[:, 1:].ravel()
    return float(math.exp(-log_probs[targets].mean()))


def run_quality(args) -> dict:
    from transformers import AutoTokenizer

    from mmphi.data.corpus import build_lm_datasets
    from mmphi.recipes import recipe_args
    from mmphi.stages import pretrain

    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    steps = str(args.max_steps)
    metrics = pretrain.main([*recipe_args("tiny", "pretrain"), "--train_files", *args.train_files,
                             "--output_dir", args.output_dir, "--max_steps", steps, "--eval_steps", steps,
                             "--save_steps", steps, "--max_eval_blocks", str(ALL_EVAL_BLOCKS), *args.extra])
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)

    tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    data = build_lm_datasets(args.train_files, tokenizer, block_size=128)  # same split, from the cache
    per_source = ALL_EVAL_BLOCKS // max(1, len(data.eval_by_source))
    if any(len(blocks) > per_source for blocks in data.eval_by_source.values()):
        raise ValueError(f"more held-out blocks than ALL_EVAL_BLOCKS ({ALL_EVAL_BLOCKS}) lets the model score: the "
                         "perplexities would not compare the same targets")
    unigram = unigram_perplexity(data.train["input_ids"], data.eval["input_ids"], len(tokenizer))
    with open(os.path.join(args.output_dir, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    last_train_log = [e for e in history if "loss" in e][-1]
    result = {
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU, no GPU",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "train_tokens": metrics["num_input_tokens_seen"],
        "train_runtime_s": metrics["train_runtime"],
        "tokens_per_second": last_train_log.get("train_tokens_per_second"),
        "cpu_seconds": round(cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime, 1),
        "eval_blocks": len(data.eval),
        "eval_tokens_scored": len(data.eval) * 127,
        "eval_loss": metrics["eval_loss"],
        "eval_perplexity": metrics["eval_perplexity"],
        "unigram_perplexity": unigram,
        "uniform_perplexity": len(tokenizer),
    }
    with open(os.path.join(args.output_dir, "bench_quality.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


# ----------------------------------------------------------------------------------------------------- memory

@dataclass
class MemoryPlan:
    """Bytes of each part of one training step's peak, for mixed precision (fp32 master weights, bf16/fp16 autocast),
    8-bit AdamW and per-layer activation checkpointing."""

    parameters: int
    weights_fp32: float
    gradients_fp32: float
    adam_8bit_states: float
    checkpointed_layer_inputs: float
    one_layer_recompute: float
    logits_and_loss: float
    total: float


def estimate_memory(config, micro_batch: int, block_size: int, n_params: int) -> MemoryPlan:
    b, s, h, n_layers, v = micro_batch, block_size, config.hidden_size, config.num_hidden_layers, config.vocab_size
    inter = config.intermediate_size
    weights = 4.0 * n_params  # fp32 master copy (autocast computes in half precision from it)
    grads = 4.0 * n_params  # fp32 .grad of every parameter
    adam = 2.0 * n_params + 2 * 4.0 * n_params / 2048  # two uint8 states + one fp32 absmax per 2048-value block each
    # Checkpointing keeps each decoder layer's input; the residual stream is fp32 under autocast.
    layer_inputs = 4.0 * n_layers * b * s * h
    # Recomputing one layer for its backward: half-precision layernorm output, q, k, v, rotated q/k, attention and
    # dense outputs (8h; SDPA never materialises the s x s scores) and fc1 output plus gelu_new's intermediates
    # (6 x intermediate), and about as much again for their gradients while that layer's backward runs.
    one_layer = 2 * (2.0 * b * s * (8 * h + 6 * inter))
    # lm_head output in half precision, its fp32 upcast for the loss, log-softmax saved for backward, fp32 gradient.
    logits = b * s * v * (2.0 + 4.0 + 4.0 + 4.0)
    total = weights + grads + adam + layer_inputs + one_layer + logits
    return MemoryPlan(n_params, weights, grads, adam, layer_inputs, one_layer, logits, total)


def flops_per_token(config, n_params: int, block_size: int, recompute: bool) -> float:
    """6N for forward+backward (+2N when checkpointing recomputes the forward) plus the attention score matmuls."""
    attention = 6 * 2 * config.num_hidden_layers * block_size * config.hidden_size  # QK^T and AV, fwd + bwd
    return (8.0 if recompute else 6.0) * n_params + attention * (4 / 3 if recompute else 1.0)


def measure_memory(config, micro_batch: int, block_size: int, steps: int, peak_tflops: float | None) -> dict:
    """Random-init model, synthetic tokens, a few optimizer steps; peak memory, tokens/s and MFU (CUDA only)."""
    import bitsandbytes as bnb
    from transformers import PhiForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config._attn_implementation = "sdpa"
    model = PhiForCausalLM(config).to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    optimizer = bnb.optim.PagedAdamW8bit(model.parameters(), lr=1e-4)
    native_bf16 = device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)  # not emulated
    dtype = torch.bfloat16 if native_bf16 else torch.float16
    tokens = torch.randint(0, config.vocab_size, (micro_batch, block_size), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype, enabled=device == "cuda"):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
    n_params = sum(p.numel() for p in model.parameters())
    steady = step_times[1:] or step_times  # the first step allocates optimizer state and warms kernels
    tokens_per_second = micro_batch * block_size / (sum(steady) / len(steady))
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "parameters": n_params,
              "micro_batch": micro_batch, "block_size": block_size, "steps": steps, "loss": loss.item(),
              "tokens_per_second": tokens_per_second,
              "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None}
    if peak_tflops and device == "cuda":
        result["mfu"] = tokens_per_second * flops_per_token(config, n_params, block_size, True) / (peak_tflops * 1e12)
    return result


def run_memory(args) -> dict:
    from mmphi.stages.pretrain import build_config, count_parameters

    config = build_config(args.config_name, args.config_overrides)
    n_params = count_parameters(config)
    if args.measure or torch.cuda.is_available():
        return {"kind": "MEASURED", **measure_memory(config, args.micro_batch, args.block_size, args.steps,
                                                   args.peak_tflops)}
    plan = estimate_memory(config, args.micro_batch, args.block_size, n_params)
    sizes_gib = {k: (v if k == "parameters" else v / GIB) for k, v in asdict(plan).items()}
    result = {"kind": "ESTIMATE (no GPU: computed, not measured)", "micro_batch": args.micro_batch,
              "block_size": args.block_size, **sizes_gib}
    fpt = flops_per_token(config, n_params, args.block_size, recompute=True)
    result["flops_per_token"] = fpt
    if args.peak_tflops:
        result["tokens_per_second_at_40pct_mfu"] = 0.4 * args.peak_tflops * 1e12 / fpt
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    quality = sub.add_parser("quality")
    quality.add_argument("--output_dir", default="outputs/bench_pretrain")
    quality.add_argument("--max_steps", type=int, default=300)
    quality.add_argument("--train_files", nargs="+", default=["data/corpus/cc.jsonl", "data/corpus/c4.jsonl"])
    quality.add_argument("extra", nargs=argparse.REMAINDER, help="more mmphi.stages.pretrain flags after `--`")
    memory = sub.add_parser("memory")
    memory.add_argument("--config_name", default="phi-2")
    memory.add_argument("--config_overrides", default=None)
    memory.add_argument("--micro_batch", type=int, default=4)
    memory.add_argument("--block_size", type=int, default=2048)
    memory.add_argument("--steps", type=int, default=4)
    memory.add_argument("--measure", action="store_true", help="run it (default only when CUDA is present)")
    memory.add_argument("--peak_tflops", type=float, default=312.0, help="dense bf16 peak (A100: 312) for MFU")
    args = parser.parse_args(argv)
    if getattr(args, "extra", None) and args.extra[0] == "--":
        args.extra = args.extra[1:]
    result = run_quality(args) if args.command == "quality" else run_memory(args)
    json.dump(result, sys.stdout, indent=2)
    print()
    return result


if __name__ == "__main__":
    main()
