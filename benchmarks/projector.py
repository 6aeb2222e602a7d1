"""Projector-stage benchmarks, in one run on the same models and data (writes outputs/bench_projector.json, prints a
table).

    python -m benchmarks.projector

1. Step time with cached vision features vs uncached (images decoded, preprocessed and run through the frozen
   tower every step), for the tiny default and for the tiny language model behind a TinyCLIP-size tower (random
   weights, the real tower's shape: 12 layers, 640-d), where the tower's share of a step is realistic.
   A step = fetch a batch (dataset + collator) + forward + backward + AdamW on the projector.
2. Time per caption: one teacher-forced forward per batch (mmphi.stages.projector) vs a per-token loop, one full
   forward of the language model per caption token over the growing prefix (image + prompt + caption so far), the
   per-token losses summed and back-propagated once. Same model, same captions, same batch size.
Reports wall and process CPU time (the CPU time is steadier on a shared machine) and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
from transformers import CLIPVisionConfig

from configuration_mmphi import TINYCLIP_VISION_CONFIG
from mmphi.build import build_tiny
from mmphi.data import MMPhiDataCollator, cache_vision_features, encode_conversations, read_source
from mmphi.data.synthetic import generate
from mmphi.stages.projector import freeze_for_training

COCO_TRAIN_IMAGES = 118_287
TOWERS = {"tiny tower (2 layers, 64-d)": None, "TinyCLIP-size tower (12 layers, 640-d)": TINYCLIP_VISION_CONFIG}


def timed(function, repeats: int) -> dict:
    """Median wall and CPU seconds of `function()` over `repeats` calls, after one warm-up call."""
    function()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


class StepRunner:
    """One projector training step per call, cycling through the dataset in order."""

    def __init__(self, model, dataset, collator, batch_size: int):
        self.model, self.dataset, self.collator, self.batch_size = model, dataset, collator, batch_size
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.position = 0

    def next_batch(self) -> dict:
        indices = [(self.position + i) % len(self.dataset) for i in range(self.batch_size)]
        self.position += self.batch_size
        return self.collator([self.dataset[i] for i in indices])

    def teacher_forced_step(self) -> None:
        loss = self.model(**self.next_batch()).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def per_token_step(self) -> None:
        """The per-token loop: for each caption position, a full LM forward over the prefix; last-position loss."""
        batch = self.next_batch()
        model = self.model
        embeddings, _ = model.model.embed_inputs(batch["input_ids"], batch.get("pixel_values"),
                                                 batch.get("vision_features"))
        labels = batch["labels"]
        answer_positions = (labels != -100).any(0).nonzero().flatten().tolist()
        loss = 0.0
        for position in answer_positions:  # predict token `position` from everything before it
            hidden = model.model.language_model(inputs_embeds=embeddings[:, :position],
                                                attention_mask=batch["attention_mask"][:, :position])
            logits = model.lm_head(hidden.last_hidden_state[:, -1])
            loss = loss + torch.nn.functional.cross_entropy(logits, labels[:, position], ignore_index=-100)
        (loss / len(answer_positions)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


def bench_tower(name: str, vision_config: dict | None, conversations, cache_root: str, args) -> dict:
    overrides = {"vision_config": CLIPVisionConfig(**vision_config)} if vision_config else {}
    model, processor = build_tiny(seed=0, **overrides)
    freeze_for_training(model)
    model.train()
    samples = encode_conversations(conversations, processor).dataset  # one sample per caption, as the stage trains
    uncached = StepRunner(model, samples, MMPhiDataCollator(processor), args.batch_size)
    images = sorted({c.image for c in conversations})
    start = time.perf_counter()
    store = cache_vision_features(model, processor, images, os.path.join(cache_root, name),
                                  batch_size=32, num_workers=args.cache_workers)
    cache_s = time.perf_counter() - start
    cached = StepRunner(model, samples, MMPhiDataCollator(processor, vision_features=store), args.batch_size)
    result = {
        "tower": name,
        "tower_parameters_M": round(sum(p.numel() for p in model.model.vision_tower.parameters()) / 1e6, 2),
        "uncached_step": timed(uncached.teacher_forced_step, args.repeats),
        "cached_step": timed(cached.teacher_forced_step, args.repeats),
        "cache_build_s": round(cache_s, 2),
        "cached_images": len(store),
        "cache_images_per_s": round(len(store) / cache_s, 1),
        "coco_118k_cache_min": round(COCO_TRAIN_IMAGES / (len(store) / cache_s) / 60, 1),  # extrapolated, same CPU
    }
    result["speedup_wall"] = result["uncached_step"]["wall_s"] / result["cached_step"]["wall_s"]
    result["speedup_cpu"] = result["uncached_step"]["cpu_s"] / result["cached_step"]["cpu_s"]
    if vision_config is None:  # the per-token comparison on the tiny default, pixel path for both
        caption_tokens = statistics.mean(sum(label != -100 for label in row["labels"]) for row in samples)
        result["teacher_forced_step"] = result["uncached_step"]
        result["per_token_loop_step"] = timed(uncached.per_token_step, max(1, args.repeats // 2))
        result["mean_caption_tokens_incl_eos"] = round(caption_tokens, 1)
        for key in ("teacher_forced_step", "per_token_loop_step"):
            result[key.replace("_step", "_per_caption_s")] = result[key]["wall_s"] / args.batch_size
        result["per_token_over_teacher_forced_wall"] = (result["per_token_loop_step"]["wall_s"]
                                                        / result["teacher_forced_step"]["wall_s"])
        result["per_token_over_teacher_forced_cpu"] = (result["per_token_loop_step"]["cpu_s"]
                                                       / result["teacher_forced_step"]["cpu_s"])
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per measurement (median)")
    parser.add_argument("--cache_workers", type=int, default=1, help="DataLoader workers decoding images to cache")
    parser.add_argument("--output_file", default="outputs/bench_projector.json")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on a shared machine 1 thread gives steadier numbers")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as root:
        data = generate(os.path.join(root, "data"), num_images=args.num_images, val_fraction=0.0, seed=0)
        conversations = read_source(data["captions_train"], data["images"])
        results = [bench_tower(name, config, conversations, os.path.join(root, "cache"), args)
                   for name, config in TOWERS.items()]
    report = {
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU" if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
        "batch_size": args.batch_size,
        "captions": len(conversations),
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
    with open(args.output_file, "w") as handle:
        json.dump(report, handle, indent=1)
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"{report['machine']}, {report['torch_threads']} threads, batch {report['batch_size']}, load average "
             f"{report['load_average_before_after'][0]} -> {report['load_average_before_after'][1]}", "",
             "| tower | uncached step s (wall / CPU) | cached step s (wall / CPU) | speed-up (wall / CPU) "
             "| cache build s | cache images/s | 118K COCO images, extrapolated |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        u, c = r["uncached_step"], r["cached_step"]
        lines.append(f"| {r['tower']}, {r['tower_parameters_M']}M | {u['wall_s']:.3f} / {u['cpu_s']:.3f} | "
                     f"{c['wall_s']:.3f} / {c['cpu_s']:.3f} | {r['speedup_wall']:.2f}x / {r['speedup_cpu']:.2f}x | "
                     f"{r['cache_build_s']} ({r['cached_images']} images) | {r['cache_images_per_s']} | "
                     f"{r['coco_118k_cache_min']} min |")
    tiny = report["results"][0]
    lines += ["", f"Per caption (tiny default, mean {tiny['mean_caption_tokens_incl_eos']} caption tokens incl. EOS): "
              f"teacher-forced {tiny['teacher_forced_per_caption_s']:.3f} s, per-token loop "
              f"{tiny['per_token_loop_per_caption_s']:.3f} s: {tiny['per_token_over_teacher_forced_wall']:.1f}x "
              f"wall, {tiny['per_token_over_teacher_forced_cpu']:.1f}x CPU"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
