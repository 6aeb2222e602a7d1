"""Synthetic images with exact ground truth, in the two formats the stages read (offline stand-in for COCO / LLaVA).

    python scripts/make_synthetic_data.py --output_dir data/synthetic --num_images 3000 --seed 0

Each image (224 x 224 PNG, near-white background) shows `count` copies (1..--max_count) of ONE shape (circle, square,
triangle) in ONE colour and ONE size (small/large), not overlapping; a single object sits inside one quadrant. So every
question has one exact, short answer. Writes, under --output_dir:

- `images/000123.png`
- `captions_train.json`, `captions_val.json`: COCO 2017 captions format
  (`{"images": [{"id", "file_name", "width", "height"}], "annotations": [{"id", "image_id", "caption"}]}`),
  three captions per image.
- `llava_instruct_train.json`, `llava_instruct_val.json`: LLaVA-Instruct format
  (`[{"id", "image", "conversations": [{"from": "human", "value", "question_type"}, {"from": "gpt", "value"}, ...]}]`),
  two records per image of 1-2 question/answer turns (yes/no drawn most often, see TYPE_WEIGHTS; a third of the
  images show a single object, see SINGLE_OBJECT_SHARE), `<image>` at the start of the first human turn, plus text-only
  records (no "image" key, question_type "text").
- `scenes.json`: the ground truth of every image (shape, colour, count, size, position, boxes) and its split.

Question types (the `question_type` key of each human turn; the gpt turn after it is the answer):
  colour -> "red" | "green" | "blue" | "yellow" | "purple" | "orange"
  count -> "1" .. "4"        shape -> "circle" | "square" | "triangle"        size -> "small" | "large"
  position (single object only, asked in each of its records) -> "top left" | "top right" | "bottom left" |
    "bottom right"
  yes/no ("Are there any blue shapes?") -> "yes" | "no"        text (no image) -> short word or digit
Answers are lowercase and canonical, so normalized exact match scores them. Train and val are split by image: no
image (and none of its captions or questions) is on both sides. Output is a pure function of the arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

IMAGE_SIZE = 224
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (26, 36), "large": (56, 72)}  # side of the bounding box in pixels ("free" layout)
# "grid" layout: the 4 x 4 grid of the tiny tower's 56-px patches; a small object fills most of one cell, a large one
# most of a 2 x 2 block. A patch then never holds parts of two objects, so counting reduces to counting coloured
# patches, and an object covers at least 1/16 of the image tokens: learnable within minutes by the offline pipeline's
# tiny tower (scripts/clip.py; a real pretrained CLIP needs no such help).
GRID, CELL = 4, IMAGE_SIZE // 4
GRID_SIZES = {"small": (1, (40, 44)), "large": (2, (92, 96))}  # (block side in cells, object side in pixels)
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
QUESTION_TYPES = ("colour", "count", "shape", "size", "position", "yes/no", "text")
# The share of images with a single object, the only scenes with a position (the other counts share the rest alike).
# The tiny Phi tells left from right only from the object token's content, so position needs many distinct single
# objects; two fifths leaked quadrant answers into colour and count questions (BENCHMARKS.md "Synthetic data").
SINGLE_OBJECT_SHARE = 0.33
# Images per dataset (`make demo` uses the default). The instruct stage runs a fixed number of steps, so more images
# cost seconds, and give left/right more distinct single objects (BENCHMARKS.md "Synthetic data").
NUM_IMAGES = 3000


@dataclass
class Scene:
    image_id: int
    file_name: str
    shape: str
    colour: str
    count: int
    size: str
    position: str | None  # quadrant of a single object; None when count > 1
    boxes: list[list[int]]  # [x0, y0, x1, y1] per object
    split: str = "train"


# --- drawing -----------------------------------------------------------------------------------------------------


def quadrant_of(box: list[int]) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    vertical = "top" if cy < IMAGE_SIZE / 2 else "bottom"
    horizontal = "left" if cx < IMAGE_SIZE / 2 else "right"
    return f"{vertical} {horizontal}"


def place_boxes(rng: random.Random, count: int, size: str, quadrant: str | None) -> list[list[int]]:
    """Non-overlapping square boxes (with a margin); a single object is kept inside `quadrant`."""
    low, high = SIZES[size]
    for _ in range(1000):  # restart when a layout gets stuck
        boxes: list[list[int]] = []
        for _ in range(200):
            side = rng.randint(low, high)
            x_range, y_range = (4, IMAGE_SIZE - side - 4), (4, IMAGE_SIZE - side - 4)
            if quadrant is not None:
                half = IMAGE_SIZE // 2
                x_range = (4, half - side - 4) if quadrant.endswith("left") else (half + 4, IMAGE_SIZE - side - 4)
                y_range = (4, half - side - 4) if quadrant.startswith("top") else (half + 4, IMAGE_SIZE - side - 4)
            x, y = rng.randint(*x_range), rng.randint(*y_range)
            box = [x, y, x + side, y + side]
            if all(not _overlap(box, other, margin=6) for other in boxes):
                boxes.append(box)
                if len(boxes) == count:
                    return boxes
    raise RuntimeError(f"could not place {count} {size} objects")  # not reached with the sizes above


def place_grid_boxes(rng: random.Random, count: int, size: str, quadrant: str | None) -> list[list[int]]:
    """Boxes in distinct, non-overlapping blocks of the patch grid; a single object's block lies in `quadrant`."""
    block, (low, high) = GRID_SIZES[size]
    starts = range(GRID - block + 1)
    if quadrant is not None:  # blocks inside the asked half (clear of the middle row/column of an odd grid)
        half = GRID // 2
        rows = range(0, half - block + 1) if quadrant.startswith("top") else range(GRID - half, GRID - block + 1)
        cols = range(0, half - block + 1) if quadrant.endswith("left") else range(GRID - half, GRID - block + 1)
        candidates = [(r, c) for r in rows for c in cols]
    else:
        candidates = [(r, c) for r in starts for c in starts]
    for _ in range(1000):  # greedy picks can block each other (two large blocks at (0, 1) and (2, 1)): retry
        rng.shuffle(candidates)
        chosen: list[tuple[int, int]] = []
        for r, c in candidates:
            if all(abs(r - r2) >= block or abs(c - c2) >= block for r2, c2 in chosen):
                chosen.append((r, c))
        if len(chosen) >= count:
            chosen = chosen[:count]
            break
    else:
        raise ValueError(f"cannot place {count} {size} objects on the {GRID} x {GRID} grid")
    boxes = []
    for r, c in chosen:
        side = rng.randint(low, high)  # centred in its block, +-2 px: a patch's pixels then vary with the object's
        offset = (block * CELL - side) // 2  # shape, size and colour only, not with a shift inside the patch
        x = c * CELL + offset + rng.randint(-2, 2)
        y = r * CELL + offset + rng.randint(-2, 2)
        boxes.append([x, y, x + side, y + side])
    return boxes


def _overlap(a: list[int], b: list[int], margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def draw_scene(rng: random.Random, scene: Scene) -> Image.Image:
    background = rng.randint(235, 255)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (background,) * 3)
    draw = ImageDraw.Draw(image)
    for box in scene.boxes:
        fill = jitter(rng, COLOURS[scene.colour], 12)
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            x0, y0, x1, y1 = box
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def draw_count(rng: random.Random, max_count: int, single_object_share: float) -> int:
    """1 with probability `single_object_share`, else uniform over 2..max_count."""
    if max_count == 1 or rng.random() < single_object_share:
        return 1
    return rng.randint(2, max_count)


def random_scene(rng: random.Random, image_id: int, max_count: int, layout: str = "grid",
                 single_object_share: float = SINGLE_OBJECT_SHARE) -> Scene:
    count = draw_count(rng, max_count, single_object_share)
    size = rng.choice(list(SIZES))
    quadrant = rng.choice(QUADRANTS) if count == 1 else None
    boxes = (place_grid_boxes if layout == "grid" else place_boxes)(rng, count, size, quadrant)
    return Scene(
        image_id=image_id,
        file_name=f"{image_id:06d}.png",
        shape=rng.choice(SHAPES),
        colour=rng.choice(list(COLOURS)),
        count=count,
        size=size,
        position=quadrant_of(boxes[0]) if count == 1 else None,
        boxes=boxes,
    )


# --- language ----------------------------------------------------------------------------------------------------


def plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + ("es" if shape.endswith(("s", "x")) else "s")


def captions_for(scene: Scene) -> list[str]:
    n, shapes = scene.count, plural(scene.shape, scene.count)
    where = f" in the {scene.position}" if scene.position else ""
    article = "a" if n == 1 else NUMBER_WORDS[n]
    return [
        f"{article.capitalize()} {scene.size} {scene.colour} {shapes}{where}.",
        f"There {'is' if n == 1 else 'are'} {n} {scene.colour} {shapes} on a white background.",
        f"A picture of {n} {scene.size} {scene.colour} {shapes}{where}.",
    ]


def image_questions(rng: random.Random, scene: Scene) -> dict[str, tuple[str, str]]:
    """One (question, answer) per type that applies to this scene; phrasings vary, answers are canonical."""
    one = scene.count == 1
    things = scene.shape if one else plural(scene.shape, 2)
    other_colour = rng.choice([c for c in COLOURS if c != scene.colour])
    asked_colour = rng.choice([scene.colour, other_colour])
    questions = {
        "colour": (
            rng.choice([f"What colour is the {scene.shape}?" if one else f"What colour are the {things}?",
                        "What colour are the shapes?", "Which colour do you see?",
                        "What color are the shapes?"]),  # US spelling: speech recognisers write "color"
            scene.colour,
        ),
        "count": (
            rng.choice([f"How many {plural(scene.shape, 2)} are there?", "How many shapes are in the image?",
                        "Count the shapes."]),
            str(scene.count),
        ),
        "shape": (
            rng.choice(["What shape is it?" if one else "What shape are they?", "Which shape is shown?"]),
            scene.shape,
        ),
        "size": (
            rng.choice([f"Is the {scene.shape} small or large?" if one else f"Are the {things} small or large?",
                        "What size are the shapes?"]),
            scene.size,
        ),
        "yes/no": (f"Are there any {asked_colour} shapes?", "yes" if asked_colour == scene.colour else "no"),
    }
    if scene.position:
        questions["position"] = (rng.choice([f"Where is the {scene.shape}?", "Where is the shape?"]), scene.position)
    return questions


def text_only_question(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        shape, sides = rng.choice([("triangle", 3), ("square", 4)])
        return f"How many sides does a {shape} have?", str(sides)
    if kind == 1:
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 2:
        word, opposite = rng.choice([("small", "large"), ("large", "small"), ("left", "right"), ("right", "left"),
                                     ("top", "bottom"), ("bottom", "top"), ("yes", "no"), ("no", "yes")])
        return f"What is the opposite of {word}?", opposite
    first, second, mixed = rng.choice([("blue", "yellow", "green"), ("red", "yellow", "orange"),
                                       ("red", "blue", "purple")])
    return f"What colour do you get by mixing {first} and {second}?", mixed


def conversation(turns: list[tuple[str, str, str]], with_image: bool) -> list[dict]:
    messages = []
    for index, (question_type, question, answer) in enumerate(turns):
        value = f"<image>\n{question}" if with_image and index == 0 else question
        messages.append({"from": "human", "value": value, "question_type": question_type})
        messages.append({"from": "gpt", "value": answer})
    return messages


# Turns per image record, and how often each type is drawn into one (others 1). The tiny Phi cannot copy from its
# context, so a type that relates the question to the image is learned only from many examples: yes/no (the asked
# colour vs the seen one) needs ~40% of the turns, count (off by one now and then) twice a plain type's draws
# (BENCHMARKS.md "Synthetic data").
TURNS_PER_RECORD = (1, 2)
TYPE_WEIGHTS = {"yes/no": 20, "count": 2}


def pick_types(rng: random.Random, available: list[str], k: int) -> list[str]:
    """`k` distinct question types: position whenever the scene has one (single objects only, the rarest), the rest
    drawn by TYPE_WEIGHTS without replacement."""
    chosen = ["position"] if "position" in available else []
    rest = sorted(t for t in available if t != "position")
    while len(chosen) < k and rest:
        picked = rng.choices(rest, [TYPE_WEIGHTS.get(t, 1) for t in rest])[0]
        chosen.append(picked)
        rest.remove(picked)
    rng.shuffle(chosen)
    return chosen


def llava_records(rng: random.Random, scene: Scene, n_records: int) -> list[dict]:
    """`n_records` records about one image, each of TURNS_PER_RECORD distinct question types."""
    records = []
    for index in range(n_records):
        questions = image_questions(rng, scene)
        types = pick_types(rng, list(questions), rng.randint(*TURNS_PER_RECORD))
        turns = [(t, *questions[t]) for t in types]
        records.append({"id": f"{scene.image_id:06d}-{index}", "image": scene.file_name,
                        "conversations": conversation(turns, with_image=True)})
    return records


def text_only_record(rng: random.Random, record_id: str) -> dict:
    turns = [("text", *text_only_question(rng)) for _ in range(rng.randint(1, 2))]
    return {"id": record_id, "conversations": conversation(turns, with_image=False)}


# --- files -------------------------------------------------------------------------------------------------------


def coco_captions(scenes: list[Scene], split: str) -> dict:
    images, annotations = [], []
    for scene in scenes:
        images.append({"id": scene.image_id, "file_name": scene.file_name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        for caption in captions_for(scene):
            annotations.append({"id": len(annotations) + 1, "image_id": scene.image_id, "caption": caption})
    return {"info": {"description": f"MM-Phi synthetic shapes, {split} split"}, "licenses": [], "images": images,
            "annotations": annotations}


def hold_out_and_draw(rng: random.Random, scenes: list[Scene], val_fraction: float, output_dir: str, draw) -> str:
    """Hold out `val_fraction` of the scenes (by image), draw every scene (`draw(rng, scene)`) into
    <output_dir>/images; returns that folder. Shared by the generators."""
    image_dir = os.path.join(output_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    n_val = min(len(scenes) - 1, max(1, round(len(scenes) * val_fraction))) if val_fraction > 0 else 0
    for scene in rng.sample(scenes, n_val):
        scene.split = "val"
    for scene in scenes:
        draw(rng, scene).save(os.path.join(image_dir, scene.file_name))
    return image_dir


def write_json(path: str, payload) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1)


def read_scenes(data_dir: str) -> list[dict]:
    """The ground truth `generate` (or another generator) wrote to `<data_dir>/scenes.json`, one dict per image."""
    with open(os.path.join(data_dir, "scenes.json")) as handle:
        return json.load(handle)


def check_arguments(num_images: int, max_count: int, layout: str, single_object_share: float) -> None:
    """Raise ValueError, naming the argument, for what `generate` cannot draw (before anything is written)."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if not 1 <= max_count <= max(NUMBER_WORDS):
        raise ValueError(f"max_count must be between 1 and {max(NUMBER_WORDS)}, got {max_count}")
    if layout not in ("grid", "free"):
        raise ValueError(f"layout must be 'grid' or 'free', got {layout!r}")
    if not 0 <= single_object_share <= 1:
        raise ValueError(f"single_object_share must be between 0 and 1, got {single_object_share}")
    capacity = min((GRID // block) ** 2 for block, _ in GRID_SIZES.values())
    if layout == "grid" and max_count > capacity:
        raise ValueError(f"the grid layout fits at most {capacity} objects of every size, got max_count {max_count}")


def generate(output_dir: str, num_images: int = NUM_IMAGES, val_fraction: float = 0.1, max_count: int = 4,
             records_per_image: int = 2, text_only_fraction: float = 0.25, seed: int = 0,
             layout: str = "grid", single_object_share: float = SINGLE_OBJECT_SHARE) -> dict[str, str]:
    """Write the dataset; returns the paths of the files written (keys: images, captions_train, captions_val,
    llava_train, llava_val, scenes)."""
    check_arguments(num_images, max_count, layout, single_object_share)
    rng = random.Random(seed)
    scenes = [random_scene(rng, image_id, max_count, layout, single_object_share)
              for image_id in range(1, num_images + 1)]
    image_dir = hold_out_and_draw(rng, scenes, val_fraction, output_dir, draw_scene)

    paths = {"images": image_dir, "scenes": os.path.join(output_dir, "scenes.json")}
    for split in ("train", "val"):
        split_scenes = [s for s in scenes if s.split == split]
        records = [r for scene in split_scenes
                   for r in llava_records(rng, scene, records_per_image)]
        n_text = round(len(records) * text_only_fraction)
        records += [text_only_record(rng, f"text-{split}-{i}") for i in range(n_text)]
        rng.shuffle(records)
        paths[f"captions_{split}"] = os.path.join(output_dir, f"captions_{split}.json")
        paths[f"llava_{split}"] = os.path.join(output_dir, f"llava_instruct_{split}.json")
        write_json(paths[f"captions_{split}"], coco_captions(split_scenes, split))
        write_json(paths[f"llava_{split}"], records)
    write_json(paths["scenes"], [asdict(scene) for scene in scenes])
    logger.info("wrote %d images (%d held out) to %s", num_images, sum(s.split == "val" for s in scenes), output_dir)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data/synthetic")
    parser.add_argument("--num_images", type=int, default=NUM_IMAGES)
    parser.add_argument("--val_fraction", type=float, default=0.1, help="held-out images (split by image)")
    parser.add_argument("--max_count", type=int, default=4, help="objects per image: 1..max_count")
    parser.add_argument("--records_per_image", type=int, default=2,
                        help=f"LLaVA records ({TURNS_PER_RECORD[0]}-{TURNS_PER_RECORD[1]} turns each) per image")
    parser.add_argument("--text_only_fraction", type=float, default=0.25,
                        help="extra text-only LLaVA records, as a share of the image records (0.25 kept held-out text "
                             "answers at 94-97%%, 0.15 at 83-89%%)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=["grid", "free"], default="grid",
                        help="grid: objects on the tiny tower's 4x4 patch grid (learnable in minutes); "
                             "free: anywhere, not overlapping")
    parser.add_argument("--single_object_share", type=float, default=SINGLE_OBJECT_SHARE,
                        help="share of the images with one object (the only ones asked where it is); the other "
                             "counts share the rest alike")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_arguments(args.num_images, args.max_count, args.layout, args.single_object_share)
    except ValueError as error:  # an argument out of range: a usage error, not a traceback
        parser.error(str(error))
    paths = generate(args.output_dir, args.num_images, args.val_fraction, args.max_count, args.records_per_image,
                     args.text_only_fraction, args.seed, args.layout, args.single_object_share)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    from mmphi.errors import run_command

    run_command(main)
