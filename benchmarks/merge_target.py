"""Merge target of a QLoRA adapter, measured: logits of (4-bit base + adapter, unmerged: what was trained) against
(a) the adapter merged into the original full-precision weights and (b) merged into the NF4-dequantized weights.

    python -m benchmarks.merge_target [--steps 40]

A tiny MM-Phi, a real instruct QLoRA run on synthetic data, then all three models on the same held-out batch (fp32,
CPU): max and mean |logit difference| over the real tokens, and how often the greedy next token agrees.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from mmphi.build import build_tiny, save_mmphi
from mmphi.data import MMPhiDataCollator, encode_conversations, read_source
from mmphi.loading import load_causal_lm, load_processor, merge_lora
from mmphi.stages import instruct


def train_adapter(base: str, data: dict, output_dir: str, steps: int) -> None:
    instruct.main(["--model_name_or_path", base, "--data_path", data["llava_train"], "--image_folder", data["images"],
                   "--output_dir", output_dir, "--lora_r", "16", "--max_steps", str(steps),
                   "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--learning_rate",
                   "5e-3", "--warmup_steps", "0", "--val_fraction", "0", "--optim", "adamw_torch",
                   "--gradient_checkpointing", "false", "--save_strategy", "no", "--disable_tqdm", "true"])


def held_out_batch(base: str, data: dict, size: int) -> dict:
    processor = load_processor(base)
    conversations = read_source(data["llava_val"], data["images"])[:size]
    rows = list(encode_conversations(conversations, processor).dataset)
    return MMPhiDataCollator(processor)(rows)


def compare(reference: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> dict:
    difference = (reference - logits).abs()[mask]
    agree = (reference.argmax(-1) == logits.argmax(-1))[mask].float().mean()
    return {"max_abs_logit_diff": float(difference.max()), "mean_abs_logit_diff": float(difference.mean()),
            "greedy_token_agreement": float(agree)}


@torch.no_grad()
def measure(base: str, adapter: str, batch: dict) -> dict:
    logits = lambda model: model(**batch).logits.float()  # noqa: E731
    reference = logits(load_causal_lm(base, adapter=adapter, quantization="4bit", device="cpu", dtype="float32"))
    mask = batch["attention_mask"].bool()
    return {target: compare(reference, logits(merge_lora(base, adapter, merge_into=target).eval()), mask)
            for target in ("original", "dequantized")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args(argv)
    from mmphi.data.synthetic import generate

    with tempfile.TemporaryDirectory() as work:
        data = generate(os.path.join(work, "data"), num_images=120, val_fraction=0.2, seed=0)
        base = os.path.join(work, "base")
        save_mmphi(*build_tiny(seed=0), base)
        train_adapter(base, data, os.path.join(work, "adapter"), args.steps)
        report = measure(base, os.path.join(work, "adapter"), held_out_batch(base, data, args.samples))
    report.update(steps=args.steps, samples=args.samples, reference="4-bit base + adapter (unmerged), fp32 compute")
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
