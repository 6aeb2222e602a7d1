"""Why a question type fails: measure each link of the chain on a finished `make demo` run, before changing
any knob.

    python -m benchmarks.question_types --work_dir outputs/demo --data_dir data

1. The data: how many training turns of each question type instruct sees, and the answer balance.
2. The tower and the projector: a linear probe (logistic regression, trained on the training images, scored on the
   held-out ones) on the projector stage's image features (tower + projector, frozen), for each scene attribute a
   question type asks about (colour, count, shape, size, position of a single object). High probe accuracy means the
   information reaches the language model; a failing type is then the language model's (or the data's) problem. All
   image tokens together can hold the position only in *which* token holds the object, so position is probed per
   token as well: a patch's grid index from its own token, a single object's quadrant from its token (the patch
   farthest from the image's median patch) and from the first token (CLS, with
   `vision_feature_select_strategy full`).
3. The language model: can it copy from its context at all? A repeated sequence of random tokens: a model with
   induction heads predicts the second copy (the mechanism that relates a question's words to earlier tokens, as
   yes/no must); one without them scores chance on both copies. Probed on the language model of pretrain and of the
   projector stage.
4. The projector stage's captions (with `--caption_predictions`): does its model name a single object's quadrant right?
5. The answers: the final model's held-out predictions per type: accuracy, the answers it gives and how they split
   by the right answer (a model that always says "yes" scores chance on yes/no); for position, which half of the
   answer is wrong: top/bottom (the image tokens' rows, contiguous in the sequence) or left/right (interleaved).
Writes one JSON report (`--output`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter, defaultdict

import torch

from benchmarks.report import write_json_report
from mmphi.data.images import load_image
from mmphi.data.synthetic import QUADRANTS, read_scenes
from mmphi.loading import load_causal_lm, load_mmphi

ATTRIBUTES = ("colour", "count", "shape", "size", "position")


def training_mix(path: str) -> dict:
    """Turns per question type in the instruct training file, and each type's answer counts."""
    with open(path) as handle:
        records = json.load(handle)
    types, answers = Counter(), defaultdict(Counter)
    for record in records:
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            kind = human.get("question_type", "?")
            types[kind] += 1
            answers[kind][gpt["value"]] += 1
    return {"turns": dict(types), "answers": {k: dict(v.most_common()) for k, v in answers.items()}}


@torch.no_grad()
def projected_features(model, processor, paths: list[str], batch: int = 64) -> torch.Tensor:
    """[images, image_seq_length, text_hidden]: what the language model receives for each image."""
    chunks = []
    for start in range(0, len(paths), batch):
        pixels = processor.image_processor([load_image(p) for p in paths[start:start + batch]],
                                           return_tensors="pt")["pixel_values"]
        chunks.append(model.model.get_image_features(pixel_values=pixels).float())
    return torch.cat(chunks)


def linear_probe(train_x, train_y, test_x, test_y, steps: int = 300) -> float:
    """Held-out accuracy of a logistic regression on standardised features (full-batch AdamW, weight decay)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = sorted(set(train_y))
    index = {c: i for i, c in enumerate(classes)}
    targets = torch.tensor([index[y] for y in train_y])
    probe = torch.nn.Linear(train_x.shape[1], len(classes))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(train_x), targets).backward()
        optimizer.step()
    predicted = probe(test_x).argmax(1).tolist()
    return sum(classes[p] == y for p, y in zip(predicted, test_y, strict=True)) / len(test_y)


def probes(model, processor, scenes: list[dict], image_folder: str) -> dict:
    train = [s for s in scenes if s["split"] == "train"]
    test = [s for s in scenes if s["split"] != "train"]
    features = {name: projected_features(model, processor, [os.path.join(image_folder, s["file_name"]) for s in part])
                for name, part in (("train", train), ("test", test))}
    results = {"position_per_token": position_per_token(features, train, test)}
    features = {name: tokens.flatten(1) for name, tokens in features.items()}
    for attribute in ATTRIBUTES:
        keep_train = [i for i, s in enumerate(train) if s.get(attribute) is not None]
        keep_test = [i for i, s in enumerate(test) if s.get(attribute) is not None]
        labels_test = [str(test[i][attribute]) for i in keep_test]
        results[attribute] = {
            "held_out_accuracy": round(linear_probe(
                features["train"][keep_train], [str(train[i][attribute]) for i in keep_train],
                features["test"][keep_test], labels_test), 4),
            "chance (majority)": round(Counter(labels_test).most_common(1)[0][1] / len(labels_test), 4),
            "held_out_images": len(keep_test),
        }
    return results


def object_token(patches: torch.Tensor) -> torch.Tensor:
    """Per image, the patch token farthest from the image's median patch (the background's)."""
    distance = (patches - patches.median(dim=1, keepdim=True).values).norm(dim=-1)
    return patches[torch.arange(len(patches)), distance.argmax(dim=1)]


def position_per_token(features: dict, train: list[dict], test: list[dict]) -> dict:
    """Can a language model read position from the token it attends to? The patches are the last grid x grid tokens
    (a CLS token, when kept, comes first)."""
    grid = int(features["train"].shape[1] ** 0.5)
    patches = {name: tokens[:, -grid * grid:] for name, tokens in features.items()}
    single = {name: [i for i, s in enumerate(part) if s.get("position")] for name, part in (("train", train),
                                                                                            ("test", test))}
    quadrants = {name: [part[i]["position"] for i in single[name]] for name, part in (("train", train),
                                                                                      ("test", test))}
    index = [str(i) for i in range(grid * grid)]
    hidden = features["train"].shape[-1]

    def probe(pick) -> float:
        return round(linear_probe(pick("train"), quadrants["train"], pick("test"), quadrants["test"]), 4)

    return {
        "grid_index_from_own_token": round(linear_probe(
            patches["train"].reshape(-1, hidden), index * len(patches["train"]),
            patches["test"].reshape(-1, hidden), index * len(patches["test"])), 4),
        "quadrant_from_object_token": probe(lambda name: object_token(patches[name][single[name]])),
        "quadrant_from_first_token": probe(lambda name: features[name][single[name], 0]),
        # what an attention head that weighs every image token alike reads
        "quadrant_from_mean_of_tokens": probe(lambda name: features[name][single[name]].mean(dim=1)),
        "chance": {"grid_index": round(1 / (grid * grid), 4), "quadrant": 0.25},
    }


def in_context_copying(model, tokenizer, length: int = 20, sequences: int = 64, seed: int = 0) -> dict:
    """Next-token accuracy on the first and the second copy of `sequences` random `length`-token sequences."""
    special = set(tokenizer.all_special_ids)
    vocabulary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    tokens = vocabulary[torch.randint(len(vocabulary), (sequences, length), generator=generator)]
    start = torch.full((sequences, 1), tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0)
    input_ids = torch.cat([start, tokens, tokens], dim=1)
    with torch.no_grad():
        predicted = model(input_ids=input_ids).logits[:, :-1].argmax(-1)
    right = predicted == input_ids[:, 1:]  # right[:, j] scores the prediction of token j + 1
    # the second copy's first token cannot be inferred from the context; its other tokens can
    return {"first_copy_accuracy": round(right[:, :length].float().mean().item(), 4),
            "second_copy_accuracy": round(right[:, length + 1:].float().mean().item(), 4),
            "chance": round(1 / len(vocabulary), 5)}


def read_predictions(path: str) -> list[dict]:
    """The rows of a `mmphi.evaluation --predictions_file` (JSON lines)."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def caption_positions(predictions_path: str) -> dict:
    """The projector stage's own reading of position: of the held-out captions whose references name a quadrant
    (single objects), how many name one, and how many the right one (`mmphi.evaluation --task caption
    --predictions_file` output)."""
    said = right = total = 0
    for row in read_predictions(predictions_path):
        truth = [q for q in QUADRANTS if any(q in reference for reference in row["references"])]
        if not truth:
            continue
        named = sorted((row["prediction"].find(q), q) for q in QUADRANTS if q in row["prediction"])
        total, said = total + 1, said + bool(named)
        right += bool(named) and named[0][1] == truth[0]  # the first quadrant the caption names
    return {"single_object_images": total, "caption_names_a_quadrant": said, "caption_names_the_right_one": right}


def answers_by_type(rows: list[dict]) -> dict:
    by_type = defaultdict(list)
    for row in rows:
        by_type[row["type"]].append(row)
    report = {}
    for kind, rows in sorted(by_type.items()):
        confusion = defaultdict(Counter)
        for row in rows:
            confusion[row["answer"]][row["prediction"]] += 1
        report[kind] = {"questions": len(rows), "accuracy": round(sum(r["correct"] for r in rows) / len(rows), 4),
                        "answers_given": dict(Counter(r["prediction"] for r in rows).most_common(8)),
                        "by_right_answer": {k: dict(v.most_common(4)) for k, v in sorted(confusion.items())}}
    return report


def position_halves(rows: list[dict]) -> dict:
    """Of the held-out position answers, how many get the vertical half (top/bottom) and the horizontal half
    (left/right) right. The patch tokens come row by row, so a language model can tell top from bottom by where a token
    sits in the sequence, but left from right only from what the token holds."""
    answers = [(row["answer"].split(), row["prediction"].split()) for row in rows if row["type"] == "position"]
    return {"questions": len(answers),
            "vertical_half_right": sum(truth[0] in words for truth, words in answers),
            "horizontal_half_right": sum(truth[-1] in words for truth, words in answers)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/demo")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--predictions", help="evaluate_mmphi.py --predictions_file output of the final model")
    parser.add_argument("--caption_predictions", help="evaluate_mmphi.py --task caption --predictions_file output "
                        "of the projector stage's model")
    parser.add_argument("--output", default="outputs/question_types.json")
    args = parser.parse_args(argv)
    synthetic = os.path.join(args.data_dir, "synthetic")
    scenes = read_scenes(synthetic)
    # on the CPU: the probes feed CPU tensors, and the demo's models are tiny
    model, processor = load_mmphi(os.path.join(args.work_dir, "projector"), device="cpu")
    report = {"training_mix": training_mix(os.path.join(synthetic, "llava_instruct_train.json")),
              "probes_on_projector_features": probes(model, processor, scenes,
                                                            os.path.join(synthetic, "images"))}
    report["language_model_copying"] = {"projector": in_context_copying(model, processor.tokenizer)}
    pretrain = os.path.join(args.work_dir, "pretrain")
    if os.path.isdir(pretrain):
        report["language_model_copying"]["pretrain"] = in_context_copying(load_causal_lm(pretrain, device="cpu"),
                                                                        processor.tokenizer)
    if args.caption_predictions:
        report["projector_caption_positions"] = caption_positions(args.caption_predictions)
    if args.predictions:
        predictions = read_predictions(args.predictions)
        report["final_model_answers"] = answers_by_type(predictions)
        report["final_model_position_halves"] = position_halves(predictions)
    return write_json_report(report, args.output)


if __name__ == "__main__":
    main()
