"""Benchmark harness: one training step of each stage, through the stage's own Trainer and through a bare PyTorch
loop on the same model and the same batch, measured in the same run.

    python -m benchmarks.benchmark --device cpu                 # tiny sizes; appends a table to BENCHMARKS.md
    python -m benchmarks.benchmark --device cuda --size real    # Phi-2 2.7B / TinyCLIP sizes (benchmarks/gpu_check.sh)
    python -m benchmarks.benchmark --estimate                   # the GPU memory ESTIMATE for the goals (no run)

Stages (random weights, data files of random words written to a temporary folder; nothing from the Hub), each built
by the stage's own `build_trainer` (benchmarks/workloads.py):
- pretrain: `PhiForCausalLM` from scratch with mmphi.stages.pretrain's training arguments (paged 8-bit AdamW,
  gradient checkpointing, bf16 on GPU) and its packed blocks; tiny: the `tiny` preset / real: Phi-2.
- projector: mmphi.stages.projector from cached tower features (its recipe's `--cache_vision_features`).
- instruct: mmphi.stages.instruct's 4-bit language model + LoRA (+ projector) through its SFTTrainer, images read
  from JPEG files by its collator every step.
Batch, sequence length and LoRA rank per size: benchmarks.workloads.SIZES.

For each: samples/s, tokens/s (image tokens included, counted in the batch that runs), median step time, peak memory
(CUDA max_memory_allocated; on CPU the process's peak RSS, reset before each phase through /proc/self/clear_refs),
MFU on GPU (benchmarks/flops.py, from each sample's actual length), and the overhead ratio Trainer step / bare step.
A Trainer step here is everything between two optimizer steps (data loading and collation, forward, backward,
clipping, optimizer, scheduler, logging); the bare loop runs forward, backward, gradient clipping and the same
optimizer class on a batch already on the device (benchmarks/measure.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict

import torch

from benchmarks.measure import free_memory, measure_stage
from benchmarks.report import (
    append_to_markdown,
    estimate,
    goal_verdicts,
    machine_description,
    markdown_run,
    peak_tflops_for,
)
from benchmarks.workloads import SIZES, make_workload

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "projector", "instruct")


def run(args) -> dict:
    device = args.device
    size = args.size or ("real" if device == "cuda" else "tiny")
    peak_tflops = peak_tflops_for(device, args.peak_tflops)
    peak_flops = peak_tflops * 1e12 if peak_tflops else None
    work_dir = tempfile.mkdtemp(prefix="mmphi-bench-", dir=args.work_dir)
    generator = torch.Generator().manual_seed(0)
    report = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine_description(device),
              "device": device, "size": size, "command": "python -m benchmarks.benchmark " + " ".join(args.argv),
              "warmup": args.warmup, "steps": args.steps, "peak_tflops": peak_tflops,
              "threads": torch.get_num_threads(), "variant": args.variant, "variant_flags": args.variant_flags,
              "load_average_before": [round(x, 2) for x in os.getloadavg()], "results": [], "errors": {}}
    try:
        for stage in args.stages:
            start = time.perf_counter()
            try:
                workload = make_workload(stage, size, device, generator, work_dir, args.model_dir,
                                         tuple(args.variant_flags.split()))
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
    parser.add_argument("--variant", default="baseline", help="a name for --variant_flags in the results")
    parser.add_argument("--variant_flags", default="", help='stage flags to A/B, e.g. "--use_liger_kernel true"')
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
