"""A second shapes generator, deliberately unlike `mmphi.data.synthetic`: the tiny recipe is run on it unchanged
to see whether it is fitted to our data.

    python -m mmphi.data.synthetic_variant --output_dir data/variant --num_images 3000 --seed 0

Differences from `synthetic`: 64 x 64 images (the processor upscales them to the tower's 224), free placement
anywhere (no patch grid), other shapes (diamond, cross, ring) and colours (pink, cyan, brown, black, lime), a
coloured background tint, other phrasings, and yes/no questions half of which are negated ("Does the image not
contain any pink shapes?", "Is there not a ring?"). Same files and formats as `synthetic` (COCO captions, LLaVA
records with `question_type`, text-only records, `scenes.json`), split by image.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from dataclasses import asdict

from PIL import Image, ImageDraw

from mmphi.data.synthetic import (
    NUM_IMAGES,
    NUMBER_WORDS,
    Scene,
    conversation,
    hold_out_and_draw,
    plural,
    text_only_record,
    write_json,
)

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
COLOURS = {"pink": (240, 110, 190), "cyan": (40, 200, 220), "brown": (130, 80, 40), "black": (25, 25, 25),
           "lime": (150, 230, 40)}
SHAPES = ("diamond", "cross", "ring")
SIZES = {"small": (9, 13), "large": (20, 26)}
BACKGROUNDS = ((245, 245, 235), (235, 240, 250), (250, 240, 240))


def place(rng: random.Random, count: int, size: str) -> list[list[int]]:
    low, high = SIZES[size]
    for _ in range(2000):
        boxes: list[list[int]] = []
        for _ in range(100):
            side = rng.randint(low, high)
            x, y = rng.randint(1, IMAGE_SIZE - side - 1), rng.randint(1, IMAGE_SIZE - side - 1)
            box = [x, y, x + side, y + side]
            if all(box[2] + 2 <= b[0] or b[2] + 2 <= box[0] or box[3] + 2 <= b[1] or b[3] + 2 <= box[1]
                   for b in boxes):
                boxes.append(box)
                if len(boxes) == count:
                    return boxes
    raise RuntimeError(f"could not place {count} {size} objects")


def quadrant(box: list[int]) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return f"{'top' if cy < IMAGE_SIZE / 2 else 'bottom'} {'left' if cx < IMAGE_SIZE / 2 else 'right'}"


def draw(rng: random.Random, scene: Scene) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), rng.choice(BACKGROUNDS))
    pen = ImageDraw.Draw(image)
    for x0, y0, x1, y1 in scene.boxes:
        fill = tuple(min(255, max(0, c + rng.randint(-10, 10))) for c in COLOURS[scene.colour])
        cx, cy, third = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 3
        if scene.shape == "diamond":
            pen.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
        elif scene.shape == "cross":
            pen.rectangle([x0 + third, y0, x1 - third, y1], fill=fill)
            pen.rectangle([x0, y0 + third, x1, y1 - third], fill=fill)
        else:
            pen.ellipse([x0, y0, x1, y1], outline=fill, width=max(2, (x1 - x0) // 5))
    return image


def random_scene(rng: random.Random, image_id: int, max_count: int) -> Scene:
    count, size = rng.randint(1, max_count), rng.choice(list(SIZES))
    boxes = place(rng, count, size)
    return Scene(image_id=image_id, file_name=f"{image_id:06d}.png", shape=rng.choice(SHAPES),
                 colour=rng.choice(list(COLOURS)), count=count, size=size,
                 position=quadrant(boxes[0]) if count == 1 else None, boxes=boxes)


def captions(scene: Scene) -> list[str]:
    n, things = scene.count, plural(scene.shape, scene.count)
    where = f", {scene.position}" if scene.position else ""
    return [f"{NUMBER_WORDS[n].capitalize()} {scene.colour} {things}{where}.",
            f"An image with {n} {scene.size} {things} coloured {scene.colour}.",
            f"{scene.size.capitalize()} {scene.colour} {things} on a pale background{where}."]


def questions(rng: random.Random, scene: Scene) -> dict[str, tuple[str, str]]:
    other_colour = rng.choice([c for c in COLOURS if c != scene.colour])
    other_shape = rng.choice([s for s in SHAPES if s != scene.shape])
    asked_colour, asked_shape = rng.choice([scene.colour, other_colour]), rng.choice([scene.shape, other_shape])
    if rng.random() < 0.5:  # about the colour, or about the shape
        there = asked_colour == scene.colour
        plain, negated = f"Is anything {asked_colour} here?", f"Does the image not contain any {asked_colour} shapes?"
    else:
        there = asked_shape == scene.shape
        plain, negated = f"Can you see a {asked_shape}?", f"Is there not a {asked_shape}?"
    # half negated, answered "yes" when the thing is absent
    yes_no = (negated, "no" if there else "yes") if rng.random() < 0.5 else (plain, "yes" if there else "no")
    found = {
        "colour": (rng.choice(["Name the colour of the objects.", "Which colour are they painted?"]), scene.colour),
        "count": (rng.choice(["How many objects can you count?", "Number of objects?"]), str(scene.count)),
        "shape": (rng.choice(["Name the shape.", "What kind of shape is drawn?"]), scene.shape),
        "size": (rng.choice(["Are they big or small? Answer small or large.", "Size of the objects?"]), scene.size),
        "yes/no": yes_no,
    }
    if scene.position:
        found["position"] = (rng.choice(["In which corner is the object?", "Which quarter holds the object?"]),
                             scene.position)
    return found


def generate(output_dir: str, num_images: int = NUM_IMAGES, val_fraction: float = 0.1, max_count: int = 4,
             text_only_fraction: float = 0.05, seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    scenes = [random_scene(rng, image_id, max_count) for image_id in range(1, num_images + 1)]
    image_dir = hold_out_and_draw(rng, scenes, val_fraction, output_dir, draw)
    paths = {"images": image_dir, "scenes": os.path.join(output_dir, "scenes.json")}
    for split in ("train", "val"):
        part = [s for s in scenes if s.split == split]
        images, annotations, records = [], [], []
        for scene in part:
            images.append({"id": scene.image_id, "file_name": scene.file_name, "width": IMAGE_SIZE,
                           "height": IMAGE_SIZE})
            annotations += [{"id": len(annotations) + 1, "image_id": scene.image_id, "caption": c}
                            for c in captions(scene)]
            asked = questions(rng, scene)
            types = rng.sample(sorted(asked), k=min(len(asked), rng.randint(2, 4)))
            records.append({"id": f"{scene.image_id:06d}-0", "image": scene.file_name,
                            "conversations": conversation([(t, *asked[t]) for t in types], with_image=True)})
        records += [text_only_record(rng, f"text-{split}-{i}") for i in range(round(len(records) * text_only_fraction))]
        rng.shuffle(records)
        paths[f"captions_{split}"] = os.path.join(output_dir, f"captions_{split}.json")
        paths[f"llava_{split}"] = os.path.join(output_dir, f"llava_instruct_{split}.json")
        write_json(paths[f"captions_{split}"], {"info": {"description": f"MM-Phi variant shapes, {split}"},
                                                 "licenses": [], "images": images, "annotations": annotations})
        write_json(paths[f"llava_{split}"], records)
    write_json(paths["scenes"], [asdict(scene) for scene in scenes])
    logger.info("wrote %d variant images to %s", num_images, output_dir)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data/variant")
    parser.add_argument("--num_images", type=int, default=NUM_IMAGES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name, path in generate(args.output_dir, args.num_images, seed=args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    from mmphi.errors import run_command

    run_command(main)
