"""The data path at real size: annotation files with the real record counts and formats, over a few hundred reused
images, through the projector and instruct stages to their first training step (the tiny model: the data path is
what is measured), a first run and a re-run, with wall time and peak RSS.

    python -m benchmarks.real_size_data --work_dir /tmp/mmphi-real-data

- COCO 2017 captions: 118,287 images, 591,753 captions (10-12 words each, as COCO's), file names cycling over 300
  drawn images.
- LLaVA-Instruct-150K: 157,712 records of 1-5 human/gpt turns (questions of ~12 words, answers of ~80: LLaVA's
  conversations and detailed descriptions), `<image>` in the first question.

Each run is `scripts/projector.py` / `scripts/instruct.py` with `--max_steps 1` in a child process under GNU time; the
re-run finds the tokenised data in the `datasets` cache (`HF_DATASETS_CACHE` under --work_dir) and the images'
features where the first run put them. `--processes 2` launches each run as two data-parallel CPU processes
(`benchmarks.real_size.timed`) with caches of their own, so that their first run starts cold.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import subprocess
import sys

from benchmarks.real_size import REPO_ROOT, timed

COCO_IMAGES, COCO_CAPTIONS, LLAVA_RECORDS, DRAWN_IMAGES = 118_287, 591_753, 157_712, 300
WORDS = ["a", "man", "woman", "dog", "cat", "red", "blue", "small", "large", "table", "street", "car", "bus", "train",
         "plate", "of", "food", "sitting", "standing", "next", "to", "the", "on", "in", "with", "near", "two", "three",
         "people", "bowl", "kitchen", "window", "room", "field", "grass", "water", "boat", "sky", "tree", "white",
         "black", "green", "holding", "looking", "at", "front", "top", "bottom", "left", "right"]


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def write_coco(path: str, file_names: list[str], rng: random.Random) -> None:
    images = [{"id": i, "file_name": file_names[i % len(file_names)], "width": 224, "height": 224}
              for i in range(COCO_IMAGES)]
    annotations = [{"id": n, "image_id": n % COCO_IMAGES, "caption": sentence(rng, rng.randint(10, 12))}
                   for n in range(COCO_CAPTIONS)]
    with open(path, "w") as handle:
        json.dump({"images": images, "annotations": annotations}, handle)


def write_llava_instruct(path: str, file_names: list[str], rng: random.Random) -> None:
    records = []
    for n in range(LLAVA_RECORDS):
        turns = []
        for turn in range(rng.randint(1, 5)):
            question = sentence(rng, rng.randint(8, 16))[:-1] + "?"
            turns += [{"from": "human", "value": ("<image>\n" if turn == 0 else "") + question},
                      {"from": "gpt", "value": " ".join(sentence(rng, 16) for _ in range(rng.randint(2, 8)))}]
        records.append({"id": str(n), "image": file_names[n % len(file_names)], "conversations": turns})
    with open(path, "w") as handle:
        json.dump(records, handle)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/mmphi-real-data")
    parser.add_argument("--processes", type=int, default=1, help="data-parallel CPU processes per run")
    args = parser.parse_args(argv)
    work = functools.partial(os.path.join, args.work_dir)
    runs = "" if args.processes == 1 else f"-{args.processes}p"  # the files are shared, the caches and outputs not
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=work(f"datasets-cache{runs}"),
               MMPHI_CACHE=work(f"mmphi{runs}"))
    if not os.path.isfile(work("llava_instruct_150k.json")):
        subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "make_synthetic_data.py"), "--output_dir",
                        work("drawn"), "--num_images", str(DRAWN_IMAGES), "--val_fraction", "0"], check=True,
                       capture_output=True)
        subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "build_model.py"), "--preset", "tiny",
                        "--output_dir", work("mmphi-tiny")], check=True, capture_output=True, env=env)
        file_names = sorted(os.listdir(work("drawn", "images")))
        rng = random.Random(0)
        write_coco(work("captions_train2017.json"), file_names, rng)
        write_llava_instruct(work("llava_instruct_150k.json"), file_names, rng)
    common = ["--model_name_or_path", work("mmphi-tiny"), "--image_folder", work("drawn", "images"), "--max_steps",
              "1", "--save_strategy", "no", "--val_fraction", "0", "--optim", "adamw_torch", "--report_to", "none"]
    results = []
    for attempt in ("first run", "re-run"):
        label = f"{attempt}, {args.processes} process{'es' if args.processes > 1 else ''}"
        results.append(timed(f"projector, COCO 2017 size, {label}", "projector.py", "--data_path",
                             work("captions_train2017.json"), "--output_dir", work(f"projector{runs}"), *common,
                             env=env, processes=args.processes))
        results.append(timed(f"instruct, LLaVA-Instruct-150K size, {label}", "instruct.py", "--data_path",
                             work("llava_instruct_150k.json"), "--output_dir", work(f"instruct{runs}"),
                             "--load_in_4bit", "false", *common, env=env, processes=args.processes))
    for row in results:
        print(json.dumps({key: value for key, value in row.items() if key != "stdout"}))
    return results


if __name__ == "__main__":
    main()
