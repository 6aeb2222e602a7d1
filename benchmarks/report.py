"""Reporting benchmark runs: the machine, the Markdown table appended to BENCHMARKS.md, the GPU memory ESTIMATE for
the real-size goals, and the goal verdicts of measured runs."""

from __future__ import annotations

import json
import logging
import os
import platform
import re

import torch

from benchmarks.measure import GIB, StageResult
from configuration_mmphi import PHI2_TEXT_CONFIG

logger = logging.getLogger(__name__)

PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.0,
               "A10G": 125.0, "L4": 121.0}
SECTION = "## Benchmark harness"


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


def write_json_report(report: dict, path: str) -> dict:
    """Write a probe's report as JSON (creating its folder) and print it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps(report, indent=1))
    return report


def append_to_markdown(path: str, block: str) -> None:
    """Add the run at the end of this harness's section (created if missing), before any later section."""
    text = "# Benchmarks\n"
    if os.path.exists(path):
        with open(path) as handle:
            text = handle.read()
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n`python -m benchmarks.benchmark` runs, newest last.\n"
    start = text.index(SECTION)
    next_section = text.find("\n## ", start + len(SECTION))
    end = len(text) if next_section == -1 else next_section + 1
    section = text[start:end].rstrip("\n") + "\n\n" + block
    text = text[:start] + section + ("\n" + text[end:] if next_section != -1 else "")
    with open(path, "w") as handle:
        handle.write(text)


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
    pretrain = {  # fp32 master weights and gradients, 8-bit AdamW: 2 bytes + a fp32 absmax per 2048 values per state
        "weights_fp32": 4 * n, "gradients_fp32": 4 * n, "adamw_8bit_states": 2 * n + 2 * 4 * n / 2048, **activations,
    }
    lora = layers * lora_r * (4 * (h + h) + (h + inter) + (inter + h))
    tower = 12 * (4 * 640 * 640 + 2 * 640 * 2560)  # TinyCLIP-61M/32 vision encoder matmuls
    instruct = {  # nf4 + double quantization (~0.5 + 0.127/8 bytes per weight); prepare_model_for_kbit_training casts
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
        "pretrain_gib": to_gib(pretrain),
        "instruct_gib": to_gib(instruct),
    }


def measured_summary(run_: dict) -> dict:
    keys = ("machine", "size", "batch", "seq", "peak_memory_gib", "peak_device_used_gib", "tokens_per_second", "mfu")
    return {k: run_[k] for k in keys if k in run_}


def goal_verdicts(paths: list[str]) -> dict:
    """The real-size goals against measured Trainer runs (GiB = 2**30 bytes), next to the estimate."""
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
            "measured": measured_summary(run_),
            "fits_40gib": max(run_["peak_memory_gib"], run_["peak_device_used_gib"]) <= 40,
            "mfu_at_least_40pct": (run_.get("mfu") or 0) >= 0.40,
        }
    if "instruct" in measured:
        run_ = measured["instruct"]
        verdicts["instruct"] = {
            "goal": "instruct QLoRA peak <= 16 GB at max_length 2048, micro-batch 4",
            "measured": measured_summary(run_),
            "peak_allocated_at_most_16gib": run_["peak_memory_gib"] <= 16,
            "card_used_at_most_16gib": run_["peak_device_used_gib"] <= 16,
        }
    return verdicts


def variants_table(reports: list[dict]) -> str:
    """Pretrain's speed-option A/B (`gpu_check.sh`): one row per variant report (`benchmarks.benchmark --variant`):
    its flags, the Trainer step, tokens/s, MFU, peak memory, the training loss over the measured run and its difference
    from the baseline's (same data and seed: a speed option must leave it at float noise)."""
    rows = []
    for report in reports:
        for result in report["results"]:
            rows.append((report.get("variant", "?"), report.get("variant_flags", ""), result))
        rows += [(report.get("variant", "?"), report.get("variant_flags", ""), {"error": error})
                 for error in report.get("errors", {}).values()]
    baseline = next((r["trainer"]["loss"] for name, _, r in rows if name == "baseline" and "trainer" in r), None)
    header = ["variant", "flags", "step (median)", "tokens/s", "MFU", "peak memory", "loss", "loss - baseline",
              "Trainer / bare"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, flags, result in rows:
        if "error" in result:
            lines.append(f"| {name} | `{flags}` | FAILED: {result['error'][:120]} |" + " |" * (len(header) - 3))
            continue
        phase = result["trainer"]
        mfu = f"{phase['mfu'] * 100:.1f}%" if phase.get("mfu") is not None else "-"
        delta = f"{phase['loss'] - baseline:+.2e}" if baseline is not None else "-"
        lines.append(f"| {name} | `{flags or '(defaults)'}` | {phase['median_step_s'] * 1000:.0f} ms | "
                     f"{phase['tokens_per_second']:.0f} | {mfu} | {format_memory(phase['peak_memory_gib'])} | "
                     f"{phase['loss']:.4f} | {delta} | {result['overhead_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Tables from benchmark JSON reports.")
    parser.add_argument("--variants", nargs="+", required=True, metavar="JSON",
                        help="benchmarks.benchmark --variant reports")
    args = parser.parse_args(argv)
    reports = []
    for path in args.variants:
        with open(path, encoding="utf-8") as handle:
            reports.append(json.load(handle))
    print(variants_table(reports), end="")


if __name__ == "__main__":
    main()
