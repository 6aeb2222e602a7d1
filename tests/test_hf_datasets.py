"""`--dataset_name`: projector and instruct train from anything `datasets.load_dataset` reads (a hub id or a local
dataset folder laid out as on the hub), in each of the three formats; TRL's format carries its images inside the
parquet."""

import gzip
import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

import mmphi.data as md
from mmphi.build import build_tiny, save_mmphi
from mmphi.data.synthetic import generate
from mmphi.stages import instruct, projector
from processing_mmphi import MMPhiProcessor

PROJECTOR_FLAGS = ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
                "--gradient_accumulation_steps", "1", "--max_steps", "2", "--optim", "adamw_torch",
                "--gradient_checkpointing", "false", "--save_strategy", "no", "--logging_steps", "1",
                "--max_eval_samples", "8", "--seed", "0"]
INSTRUCT_FLAGS = ["--load_in_4bit", "false", "--lora_r", "4", "--max_steps", "2", "--per_device_train_batch_size", "2",
                "--gradient_accumulation_steps", "1", "--optim", "adamw_torch", "--warmup_steps", "0",
                "--max_eval_samples", "4", "--save_strategy", "no", "--logging_steps", "1", "--max_length", "128"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "mmphi"
    save_mmphi(*build_tiny(seed=0), str(folder))
    return folder


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("synthetic")), num_images=12, val_fraction=0.25,
                    text_only_fraction=0.0, seed=3)


def llava_records(synthetic, key="llava_train"):
    return json.loads(Path(synthetic[key]).read_text())


def to_trl_rows(records, image_folder):
    """LLaVA records -> TRL's vision format with each image embedded (PNG bytes), as hub parquet stores them."""
    rows = []
    for record in records:
        messages = []
        for index, turn in enumerate(record["conversations"]):
            text = turn["value"].replace("<image>", "").strip()
            content = [{"type": "text", "text": text}]
            if index == 0:
                content.insert(0, {"type": "image", "text": None})
            messages.append({"role": "user" if turn["from"] == "human" else "assistant", "content": content})
        image = Image.open(Path(image_folder) / record["image"]).convert("RGB")
        rows.append({"messages": messages, "images": [image]})
    return rows


def write_trl_folder(folder: Path, splits: dict[str, list]) -> Path:
    for split, rows in splits.items():
        dataset = datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image()))
        (folder / "data").mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


def test_coco_captions_folder_trains_the_projector_like_the_file(base, synthetic, tmp_path):
    """A folder holding COCO caption files (train + validation, as a hub repo would) is read by load_dataset; the
    samples are those of the file path, and the validation split is the held-out data."""
    folder = tmp_path / "coco"
    folder.mkdir()
    (folder / "captions_train.json").write_text(Path(synthetic["captions_train"]).read_text())
    (folder / "captions_validation.json").write_text(Path(synthetic["captions_val"]).read_text())
    common = ["--model_name_or_path", str(base), "--image_folder", synthetic["images"], *PROJECTOR_FLAGS]
    from_folder = projector.build_trainer(*projector.parse_args(
        ["--dataset_name", str(folder), "--validation_split", "validation", "--output_dir", str(tmp_path / "a"),
         *common]))
    from_files = projector.build_trainer(*projector.parse_args(
        ["--data_path", synthetic["captions_train"], "--eval_data_path", synthetic["captions_val"],
         "--eval_image_folder", synthetic["images"], "--output_dir", str(tmp_path / "b"), *common]))
    assert from_folder.train.dataset["input_ids"] == from_files.train.dataset["input_ids"]
    assert from_folder.evaluation.dataset["image"] == from_files.evaluation.dataset["image"]
    metrics = from_folder.trainer.train().metrics
    assert math.isfinite(metrics["train_loss"]) and from_folder.trainer.state.global_step == 2


def test_llava_jsonl_folder_trains_instruct_and_compressed_files_read_the_same(base, synthetic, tmp_path):
    records = llava_records(synthetic)
    folder = tmp_path / "llava"
    folder.mkdir()
    with gzip.open(folder / "train.jsonl.gz", "wt") as handle:
        handle.write("\n".join(json.dumps(r) for r in records))
    plain = md.read_source(synthetic["llava_train"], synthetic["images"])
    from_gzip = md.read_source(str(folder / "train.jsonl.gz"), synthetic["images"])
    assert [(c.image, c.turns) for c in from_gzip] == [(c.image, c.turns) for c in plain]
    metrics = instruct.main(["--model_name_or_path", str(base), "--dataset_name", str(folder), "--image_folder",
                             synthetic["images"], "--output_dir", str(tmp_path / "out"), "--val_fraction", "0.25",
                             *INSTRUCT_FLAGS])
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 2


def test_trl_parquet_with_embedded_images_trains_instruct_without_an_image_folder(base, synthetic, tmp_path):
    """Hub-style TRL data: `messages` + embedded `images` in parquet shards under data/. No image folder; the images
    stay in the arrow cache and decode to the same pixels as the original files."""
    train, val = llava_records(synthetic), llava_records(synthetic, "llava_val")
    folder = write_trl_folder(tmp_path / "trl", {"train": to_trl_rows(train, synthetic["images"]),
                                                 "validation": to_trl_rows(val, synthetic["images"])})
    conversations = md.read_source(md.DataSource(name=str(folder), split="train"))
    assert len(conversations) == len(train)
    expected = md.read_source(synthetic["llava_train"], synthetic["images"])
    def pairs(items):
        return [[(t.question, t.answer) for t in c.turns] for c in items]

    assert pairs(conversations) == pairs(expected)
    processor = MMPhiProcessor.from_pretrained(base)
    for got, want in zip(conversations[:3], expected[:3], strict=True):
        assert "#row=" in got.image
        pixels = [processor.image_processor([md.load_image(c.image)], return_tensors="pt")["pixel_values"]
                  for c in (got, want)]
        torch.testing.assert_close(*pixels)

    metrics = instruct.main(["--model_name_or_path", str(base), "--dataset_name", str(folder), "--validation_split",
                             "validation", "--output_dir", str(tmp_path / "out"), *INSTRUCT_FLAGS])
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])


def test_trl_data_trains_the_projector_through_the_feature_cache(base, synthetic, tmp_path):
    """Embedded images go through the projector's feature cache like files do (keys decode in the cache's workers)."""
    folder = write_trl_folder(tmp_path / "trl", {"train": to_trl_rows(llava_records(synthetic), synthetic["images"])})
    metrics = projector.main(["--model_name_or_path", str(base), "--dataset_name", str(folder), "--output_dir",
                              str(tmp_path / "out"), "--val_fraction", "0.25", "--cache_vision_features",
                              *PROJECTOR_FLAGS])
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])


def test_bad_trl_records_and_images_are_named_or_counted(synthetic, tmp_path):
    rows = to_trl_rows(llava_records(synthetic)[:4], synthetic["images"])
    rows[1]["messages"][0]["role"] = "system"
    rows[2]["images"] = [rows[2]["images"][0], rows[2]["images"][0]]  # two images, one placeholder
    folder = write_trl_folder(tmp_path / "trl", {"train": rows})
    source = md.DataSource(name=str(folder))
    with pytest.raises(md.BadRecordError, match=r"trl:train: record 1: message 0 has role 'system'"):
        md.read_source(source)
    report = md.SkipReport()
    assert len(md.read_source(source, skip_bad_records=True, report=report)) == 2
    assert report.total == 2 and "2 image(s) in \"images\" but 1" in report.summary()

    broken = datasets.Dataset.from_list([{"messages": rows[0]["messages"], "images": [{"bytes": b"not a png",
                                                                                        "path": None}]}])
    broken = broken.cast_column("images", datasets.List(datasets.Image()))
    write_parquet = tmp_path / "broken" / "data"
    write_parquet.mkdir(parents=True)
    broken.to_parquet(str(write_parquet / "train-00000-of-00001.parquet"))
    n_good, report = md.validate_source(md.DataSource(name=str(tmp_path / "broken")))
    assert n_good == 0 and report.total == 1 and "cannot read image" in report.examples[0]
    assert "broken:train: record 0" in report.examples[0]


def test_unknown_columns_and_missing_splits_are_clear_errors(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"img": "a.png", "txt": "x"}) + "\n")
    with pytest.raises(md.BadRecordError, match=r"odd:train: no known dataset format fits \(columns \['img', 'txt'\]"):
        md.read_source(md.DataSource(name=str(folder)))
    with pytest.raises(ValueError, match=r"odd:validation: cannot load the dataset"):
        md.read_source(md.DataSource(name=str(folder), split="validation"))
    with pytest.raises(ValueError, match="exactly one of --data_path"):
        instruct.parse_args(["--model_name_or_path", "x", "--output_dir", str(tmp_path / "o")])
    (tmp_path / "data.csv").write_text("image,caption\n")
    with pytest.raises(ValueError, match="unsupported data file type"):
        md.read_source(str(tmp_path / "data.csv"))


def test_json_lines_errors_name_the_line(tmp_path):
    path = tmp_path / "records.jsonl"
    good = {"id": 1, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path.write_text(json.dumps(good) + "\n" + "{not json\n")
    with pytest.raises(md.BadRecordError, match=r"records\.jsonl: line 2: malformed JSON"):
        md.read_source(str(path))
