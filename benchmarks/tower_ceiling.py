"""How much of a shapes dataset can the tiny tower learn at all?

    python -m benchmarks.tower_ceiling --data_dir data/variant --steps 2000

The tiny CLIP is the offline stand-in for TinyCLIP, trained from scratch on the dataset's own images. When a question
type that depends on the image (count, shape) stays low after instruct, either the recipe fails to pass on what the
tower knows, or the tower cannot know it. This measures the second: the same tower architecture (MM-Phi's
`TINY_VISION_CONFIG`, the same position init), trained *supervised* on the training images' scene labels (one linear
head per attribute on the pooled CLS token, summed cross-entropy, AdamW), scored on the held-out images. Direct labels
are the easiest signal a tower can get, so its held-out accuracy bounds what the contrastive tiny CLIP, and through it
the language model, can reach on that data. `--tower` overrides config fields (e.g. a bigger tower, or
`{"image_size": 64, "patch_size": 16}` to keep 10K images in memory: every image is held as pixels, ~0.6 MB each at
224 px). A CPU diagnostic for the generators' data (it needs `scenes.json`), not for COCO. Writes one JSON report
(`--output`).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.report import write_json_report
from mmphi.build import new_tiny_tower, tiny_image_processor
from mmphi.data.images import load_image
from mmphi.data.synthetic import read_scenes

ATTRIBUTES = ("count", "shape")


def labelled_images(data_dir: str, processor, attributes=ATTRIBUTES) -> dict:
    """Per split, the processed pixels and each attribute's class indices, from the generator's `scenes.json`."""
    scenes = read_scenes(data_dir)
    classes = {a: sorted({str(s[a]) for s in scenes}) for a in attributes}
    splits = {}
    for split in ("train", "val"):
        part = [s for s in scenes if (s["split"] == "train") == (split == "train")]
        if not part:
            raise ValueError(f"{data_dir}/scenes.json has no {split} images")
        pixels = processor([load_image(os.path.join(data_dir, "images", s["file_name"])) for s in part],
                           return_tensors="pt")["pixel_values"]
        labels = {a: torch.tensor([classes[a].index(str(s[a])) for s in part]) for a in attributes}
        splits[split] = (pixels, labels)
    return {"classes": classes, **splits}


def supervised_ceiling(data_dir: str, steps: int = 2000, batch_size: int = 64, learning_rate: float = 1e-3,
                       seed: int = 0, tower: dict | None = None, eval_every: int = 500,
                       attributes=ATTRIBUTES) -> dict:
    """Held-out accuracy per attribute of the tiny tower trained on the labels (every `eval_every` steps)."""
    model = new_tiny_tower(seed, **(tower or {}))
    config = model.config
    data = labelled_images(data_dir, tiny_image_processor(config.image_size), attributes)
    heads = torch.nn.ModuleDict({a: torch.nn.Linear(config.hidden_size, len(data["classes"][a]))
                                 for a in attributes})
    optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=learning_rate, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.05)
    train_pixels, train_labels = data["train"]

    def held_out() -> dict:
        pixels, labels = data["val"]
        with torch.no_grad():
            pooled = torch.cat([model(pixel_values=chunk).pooler_output for chunk in pixels.split(100)])
        return {a: round((heads[a](pooled).argmax(1) == labels[a]).float().mean().item(), 4) for a in attributes}

    curve = []
    for step in range(1, steps + 1):
        picked = torch.randint(0, len(train_pixels), (batch_size,))
        pooled = model(pixel_values=train_pixels[picked]).pooler_output
        loss = sum(torch.nn.functional.cross_entropy(heads[a](pooled), train_labels[a][picked]) for a in attributes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % eval_every == 0 or step == steps:
            curve.append({"step": step, "train_loss": round(loss.item(), 4), **held_out()})
    return {"data_dir": data_dir, "train_images": len(train_pixels), "held_out_images": len(data["val"][0]),
            "classes": data["classes"], "tower": config.to_diff_dict(), "steps": steps, "curve": curve}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="a generator's output (scenes.json + images/)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tower", type=json.loads, default=None, help="JSON overrides of TINY_VISION_CONFIG")
    parser.add_argument("--output", default="outputs/tower_ceiling.json")
    args = parser.parse_args(argv)
    report = supervised_ceiling(args.data_dir, args.steps, args.batch_size, args.learning_rate, args.seed, args.tower)
    return write_json_report(report, args.output)


if __name__ == "__main__":
    main()
