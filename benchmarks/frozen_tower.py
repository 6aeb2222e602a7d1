"""Instruct with a frozen TinyCLIP-size tower: step time when the tower runs with autograd (TRL's
enable_input_require_grads hooks CLIP's patch embedding, so a graph is built through the frozen tower) and without
it (MMPhiModel.get_vision_features turns autograd off for a frozen tower). Both in one run, same data and model.

    python -m benchmarks.frozen_tower [--steps 6 --batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import types

import torch
from transformers import CLIPVisionConfig

from benchmarks.measure import StepTimer
from configuration_mmphi import TINYCLIP_VISION_CONFIG
from mmphi.build import build_tiny, save_mmphi
from mmphi.data.synthetic import generate
from mmphi.stages import instruct


def tower_with_autograd(self, pixel_values):
    """The old get_vision_features: the tower always under the caller's grad mode."""
    tower_dtype = self.vision_tower.get_input_embeddings().weight.dtype
    outputs = self.vision_tower(pixel_values.to(tower_dtype), output_hidden_states=True, return_dict=True)
    layers = self.config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else layers
    features = torch.cat([outputs.hidden_states[layer] for layer in layers], dim=-1)
    return features[:, 1:] if self.config.vision_feature_select_strategy == "default" else features


def step_seconds(work: str, data: dict, folder: str, args, patch: bool) -> list[float]:
    stage = instruct.build_trainer(*instruct.parse_args([
        "--model_name_or_path", folder, "--data_path", data["llava_train"], "--image_folder", data["images"],
        "--output_dir", os.path.join(work, "out"), "--lora_r", "8", "--val_fraction", "0", "--max_length", "128",
        "--per_device_train_batch_size", str(args.batch), "--gradient_accumulation_steps", "1",
        "--max_steps", str(args.warmup + args.steps), "--optim", "adamw_torch", "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", "--train_sampling_strategy", "sequential",
    ]))
    if patch:
        backbone = stage.trainer.model.get_base_model().model
        backbone.get_vision_features = types.MethodType(tower_with_autograd, backbone)
    timer = StepTimer("cpu")
    stage.trainer.add_callback(timer.callback)
    stage.trainer.train()
    stamps = timer.stamps[args.warmup - 1:]
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="alternating before/after rounds")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        data = generate(os.path.join(work, "data"), num_images=24, val_fraction=0.0, seed=0)
        model, processor = build_tiny(seed=0, vision_config=CLIPVisionConfig(**TINYCLIP_VISION_CONFIG))
        folder = os.path.join(work, "mmphi")
        save_mmphi(model, processor, folder)
        times = {"tower with autograd (before)": [], "tower without autograd (now)": []}
        for _ in range(args.repeats):  # alternate, so drift in machine load hits both
            for label, patch in zip(times, (True, False), strict=True):
                times[label] += step_seconds(work, data, folder, args, patch)
    report = {label: round(statistics.median(t), 4) for label, t in times.items()}
    before, after = report.values()
    report.update(ratio_before_over_now=round(before / after, 3), batch=args.batch, steps=len(times[label]),
                  machine=f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}",
                  load_average=[round(x, 2) for x in os.getloadavg()])
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
