"""The shared data module (mmphi/data/) and the synthetic data generator, on the tiny default (CPU, fast)."""

import bz2
import gzip
import json
import logging
import lzma
import os
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import zstandard
from PIL import Image

from mmphi import data as md
from mmphi import training
from mmphi.build import build_tiny
from mmphi.data.synthetic import (
    CELL,
    COLOURS,
    GRID_SIZES,
    TURNS_PER_RECORD,
    generate,
)
from mmphi.data.synthetic import main as synthetic_main


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny(seed=0)
    return model.eval(), processor


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return generate(str(root), num_images=40, val_fraction=0.25, seed=3)


def llava_file(tmp_path, records, name="llava.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def read_llava(path, image_folder=None, **options):
    return md.read_source(path, image_folder, data_format="llava", **options)


def coco_images(path, image_folder=None, **options):
    return md.captioned_images(md.read_source(path, image_folder, data_format="coco_captions", **options))


def red_png(folder, name="red.png"):
    Image.new("RGB", (32, 32), (200, 20, 20)).save(os.path.join(folder, name))
    return name


def turns(*pairs):
    out = []
    for question, answer in pairs:
        out += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return out


# --- synthetic data ----------------------------------------------------------------------------------------------


def test_synthetic_images_match_their_ground_truth(synthetic):
    scenes = json.loads(Path(synthetic["scenes"]).read_text())
    assert {s["count"] for s in scenes} == {1, 2, 3, 4}
    for scene in scenes:
        image = Image.open(os.path.join(synthetic["images"], scene["file_name"])).convert("RGB")
        assert len(scene["boxes"]) == scene["count"]
        for x0, y0, x1, y1 in scene["boxes"]:
            centre = image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))  # inside every shape kind
            assert max(abs(a - b) for a, b in zip(centre, COLOURS[scene["colour"]], strict=True)) <= 12, scene
        corner = image.getpixel((1, 1))
        assert min(corner) >= 235  # background


def test_grid_layout_never_puts_two_objects_in_one_patch(synthetic):
    cell = CELL
    for scene in json.loads(Path(synthetic["scenes"]).read_text()):
        patches = [{(x // cell, y // cell) for x in range(x0, x1) for y in range(y0, y1)}
                   for x0, y0, x1, y1 in scene["boxes"]]
        for i, first in enumerate(patches):
            assert len(first) == GRID_SIZES[scene["size"]][0] ** 2
            assert all(not first & other for other in patches[i + 1 :]), scene


def test_synthetic_answers_are_the_ground_truth(synthetic):
    scenes = {s["file_name"]: s for s in json.loads(Path(synthetic["scenes"]).read_text())}
    conversations = read_llava(synthetic["llava_train"], synthetic["images"])
    seen_types = set()
    for conversation in conversations:
        for turn in conversation.turns:
            seen_types.add(turn.question_type)
            if conversation.image is None:
                assert turn.question_type == "text"
                continue
            scene = scenes[os.path.basename(conversation.image)]
            expected = {"colour": scene["colour"], "count": str(scene["count"]), "shape": scene["shape"],
                        "size": scene["size"], "position": scene["position"]}
            if turn.question_type in expected:
                assert turn.answer == expected[turn.question_type], (conversation.id, turn)
    assert {"colour", "count", "shape", "size", "text"} <= seen_types
    assert any(len(c.turns) > 1 for c in conversations)
    raw = json.loads(Path(synthetic["llava_train"]).read_text())
    image_record = next(r for r in raw if "image" in r)
    assert image_record["conversations"][0]["value"].startswith("<image>\n")


def test_every_single_object_record_asks_where_it_is(synthetic):
    """Position is the one type only single objects have, so it is asked in each of their records."""
    scenes = {s["file_name"]: s for s in json.loads(Path(synthetic["scenes"]).read_text())}
    records = [r for r in json.loads(Path(synthetic["llava_train"]).read_text()) if "image" in r]
    single = [r for r in records if scenes[r["image"]]["count"] == 1]
    assert single and len(single) < len(records)
    for record in records:
        asked = [t["question_type"] for t in record["conversations"] if t["from"] == "human"]
        assert ("position" in asked) == (scenes[record["image"]]["count"] == 1), record["id"]
        assert len(asked) == len(set(asked)) and TURNS_PER_RECORD[0] <= len(asked) <= TURNS_PER_RECORD[1]


def test_every_image_gets_its_records_per_image(synthetic):
    """Every image, single object or not, gets --records_per_image records (2), in both splits: position gets its
    share of the turns from how many images show a single object (SINGLE_OBJECT_SHARE), not from repeats."""
    records = {split: Counter(r["image"] for r in json.loads(Path(synthetic[split]).read_text()) if "image" in r)
               for split in ("llava_train", "llava_val")}
    scenes = json.loads(Path(synthetic["scenes"]).read_text())
    assert sum(records.values(), Counter()) == Counter({scene["file_name"]: 2 for scene in scenes})


@pytest.mark.parametrize("share", [0.0, 0.4, 1.0])
def test_single_object_share_sets_how_many_images_have_a_position(tmp_path, share):
    """Single objects are the only scenes asked where they are; --single_object_share sets how many there are,
    and the other counts share the rest alike."""
    paths = generate(str(tmp_path), num_images=300, val_fraction=0.1, seed=2, single_object_share=share)
    counts = Counter(scene["count"] for scene in json.loads(Path(paths["scenes"]).read_text()))
    assert abs(counts[1] / 300 - share) < 0.08, counts
    if share < 1:
        assert {2, 3, 4} <= set(counts) and max(counts[n] for n in (2, 3, 4)) < 2 * min(counts[n] for n in (2, 3, 4))
    asked = {turn["question_type"] for record in json.loads(Path(paths["llava_train"]).read_text())
             for turn in record["conversations"] if turn["from"] == "human"}
    assert ("position" in asked) == (share > 0)


def test_single_object_share_out_of_range_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="single_object_share must be between 0 and 1, got 1.5"):
        generate(str(tmp_path), num_images=4, single_object_share=1.5)
    with pytest.raises(SystemExit) as exit_:  # the command line says so as a usage error, before writing anything
        synthetic_main(["--output_dir", str(tmp_path / "cli"), "--single_object_share", "1.5"])
    assert exit_.value.code == 2 and not (tmp_path / "cli").exists()
    assert "single_object_share must be between 0 and 1, got 1.5" in capsys.readouterr().err


def test_zero_images_is_a_usage_error_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(ValueError, match="num_images must be at least 1, got 0"):
        generate(str(tmp_path / "api"), num_images=0)
    with pytest.raises(SystemExit) as exit_:
        synthetic_main(["--output_dir", str(tmp_path / "cli"), "--num_images", "0"])
    assert exit_.value.code == 2
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()
    assert "num_images must be at least 1, got 0" in capsys.readouterr().err


def test_yes_no_gets_the_largest_share_of_the_turns(tmp_path):
    """yes/no's comparison needs the most examples: it is drawn TYPE_WEIGHTS times as often as a plain type, and
    count (off by one now and then) twice as often."""
    paths = generate(str(tmp_path), num_images=400, val_fraction=0.1, seed=1)
    asked = Counter(turn["question_type"] for record in json.loads(Path(paths["llava_train"]).read_text())
                    for turn in record["conversations"] if turn["from"] == "human")
    share = {question_type: n / sum(asked.values()) for question_type, n in asked.items()}
    assert max(share, key=share.get) == "yes/no" and share["yes/no"] > 0.3
    plain = [share[question_type] for question_type in ("colour", "shape", "size")]
    assert all(0.03 < one < share["yes/no"] / 4 for one in plain), share
    assert 1.5 < share["count"] / (sum(plain) / 3) < 2.5, share


def test_synthetic_split_is_by_image_in_both_formats(synthetic):
    def images_of(split):
        coco = json.loads(Path(synthetic[f"captions_{split}"]).read_text())
        llava = json.loads(Path(synthetic[f"llava_{split}"]).read_text())
        return {i["file_name"] for i in coco["images"]}, {r["image"] for r in llava if "image" in r}

    train_coco, train_llava = images_of("train")
    val_coco, val_llava = images_of("val")
    assert train_coco == train_llava and val_coco == val_llava
    assert not train_coco & val_coco and len(val_coco) == 10


def test_synthetic_data_is_deterministic(tmp_path):
    first = generate(str(tmp_path / "a"), num_images=6, seed=1)
    second = generate(str(tmp_path / "b"), num_images=6, seed=1)
    for key in ("captions_train", "llava_train", "llava_val", "scenes"):
        assert Path(first[key]).read_text() == Path(second[key]).read_text()
    for name in sorted(os.listdir(first["images"])):
        a, b = (Path(p["images"], name).read_bytes() for p in (first, second))
        assert a == b


# --- encoding and label masks ------------------------------------------------------------------------------------


def test_labels_are_answers_and_their_eos_only(tiny, tmp_path):
    _, processor = tiny
    conversation = md.Conversation("c", str(tmp_path / red_png(tmp_path)),
                                   [md.Turn("What colour is it?", "red"), md.Turn("How many shapes?", "3")])
    input_ids, labels = md.encode_conversation(processor, conversation)
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token
    kept = [label for label in labels if label != md.IGNORE_INDEX]
    assert tokenizer.decode(kept) == f" red{eos} 3{eos}"
    assert all(label in (md.IGNORE_INDEX, token) for token, label in zip(input_ids, labels, strict=True))
    assert input_ids.count(processor.image_token_id) == processor.image_seq_length
    assert all(label == md.IGNORE_INDEX for token, label in zip(input_ids, labels, strict=True)
               if token == processor.image_token_id)
    # the question tokens carry no loss; the EOS of each answer does
    assert kept.count(tokenizer.eos_token_id) == 2
    assert tokenizer.decode(input_ids).count("What colour is it?") == 1


def test_tokenised_samples_are_cached_by_content(tiny, synthetic):
    """A second encoding of the same records (a re-run, or another DDP process after the main one) loads the arrow
    file the first wrote; other records or another max_length get their own."""
    _, processor = tiny
    conversations = read_llava(synthetic["llava_train"], synthetic["images"])[:20]
    first = md.encode_conversations(conversations, processor, max_length=96)
    files = [entry["filename"] for entry in first.dataset.cache_files]
    assert files and all("mmphi-encoded" in name for name in files)
    again = md.encode_conversations(conversations, processor, max_length=96)
    assert [entry["filename"] for entry in again.dataset.cache_files] == files
    assert again.dataset["input_ids"] == first.dataset["input_ids"]
    other = md.encode_conversations(conversations, processor, max_length=80)
    assert [entry["filename"] for entry in other.dataset.cache_files] != files
    assert md.encode_conversations(conversations[:10], processor, max_length=96).dataset.cache_files != \
        first.dataset.cache_files


def test_encoding_equals_the_processor_chat_template(tiny, synthetic):
    _, processor = tiny
    for conversation in read_llava(synthetic["llava_val"], synthetic["images"])[:6]:
        input_ids, labels = md.encode_conversation(processor, conversation)
        messages = conversation.messages()
        if conversation.image:
            messages[0]["content"][0] = {"type": "image", "image": Image.open(conversation.image)}
        reference = processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                  return_assistant_tokens_mask=True)
        assert reference["input_ids"][0].tolist() == input_ids
        assert list(reference["assistant_masks"][0]) == [int(label != md.IGNORE_INDEX) for label in labels]


def test_image_placeholder_anywhere_in_the_first_turn(tiny, tmp_path):
    _, processor = tiny
    name = red_png(tmp_path)
    records = [{"id": "end", "image": name, "conversations": turns(("What colour?\n<image>", "red"))},
               {"id": "missing", "image": name, "conversations": turns(("What colour?", "red"))}]
    conversations = read_llava(llava_file(tmp_path, records), str(tmp_path))
    encoded = [md.encode_conversation(processor, c) for c in conversations]
    assert encoded[0] == encoded[1]
    assert processor.tokenizer.decode(encoded[0][0]).startswith(
        "User: " + "<image>" * processor.image_seq_length + "\nWhat colour?"
    )


def test_truncation_never_cuts_image_tokens(tiny, tmp_path):
    _, processor = tiny
    image = str(tmp_path / red_png(tmp_path))
    long_answer = "red " * 40
    conversation = md.Conversation("c", image, [md.Turn("Describe it.", long_answer.strip())])
    full_ids, full_labels = md.encode_conversation(processor, conversation)
    image_end = max(i for i, t in enumerate(full_ids) if t == processor.image_token_id) + 1
    first_answer = next(i for i, label in enumerate(full_labels) if label != md.IGNORE_INDEX)

    cut = md.encode_conversations([conversation], processor, max_length=first_answer + 3)
    assert len(cut) == 1 and cut.truncation.truncated == 1 and cut.lengths == [first_answer + 3]
    item = cut.dataset[0]
    assert item["input_ids"].count(processor.image_token_id) == processor.image_seq_length
    assert sum(label != md.IGNORE_INDEX for label in item["labels"]) > 0

    text_only = md.Conversation("t", None, [md.Turn("Hi", "hello")])
    dropped = md.encode_conversations([conversation, text_only], processor, max_length=image_end - 5)
    assert len(dropped) == 1 and dropped.truncation.dropped_image_cut == 1
    no_answer = md.encode_conversations([conversation, text_only], processor, max_length=first_answer)
    assert len(no_answer) == 1 and no_answer.truncation.dropped_no_answer == 1
    with pytest.raises(ValueError, match="no sample fits"):
        md.encode_conversations([conversation], processor, max_length=image_end - 5)


# --- collator ----------------------------------------------------------------------------------------------------


def test_collator_mixes_image_and_text_only_samples(tiny, synthetic):
    model, processor = tiny
    conversations = read_llava(synthetic["llava_train"], synthetic["images"])
    with_image = [c for c in conversations if c.image][:2]
    text_only = [c for c in conversations if c.image is None][:2]
    order = [with_image[0], text_only[0], text_only[1], with_image[1]]
    dataset = md.encode_conversations(order, processor)
    rows = list(dataset.dataset)
    collator = md.MMPhiDataCollator(processor)
    batch = collator(rows)

    tokenizer = processor.tokenizer
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert batch["pixel_values"].shape == (2, 3, 224, 224)
    for row, length in enumerate(dataset.lengths):
        assert batch["attention_mask"][row].sum() == length
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()  # right padding, pad token
        assert (batch["labels"][row, length:] == md.IGNORE_INDEX).all()
    assert collator.padding_fraction == pytest.approx(md.padding_fraction(dataset.lengths, len(dataset)))

    # each sample's logits in the mixed batch equal its logits alone: images were matched to the right samples
    with torch.no_grad():
        output = model(**batch)
        assert torch.isfinite(output.loss)
        for row in (1, 3):  # a text-only sample after an image one; an image sample after text-only ones
            single = model(**collator([rows[row]])).logits[0]
            torch.testing.assert_close(output.logits[row, : dataset.lengths[row]], single, atol=1e-4, rtol=1e-4)


def test_collator_refuses_pad_equal_to_eos(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="pad token must differ from EOS"):
        md.MMPhiDataCollator(processor, pad_token_id=processor.tokenizer.eos_token_id)


def test_length_grouping_reduces_padding_without_loading_samples(tiny, synthetic):
    from types import SimpleNamespace

    _, processor = tiny
    conversations = read_llava(synthetic["llava_train"], synthetic["images"])
    dataset = md.encode_conversations(conversations, processor)
    args = SimpleNamespace(train_sampling_strategy="group_by_length", per_device_train_batch_size=4, world_size=1,
                           gradient_accumulation_steps=1, seed=42, data_seed=None)
    # the mixin only reads these two; the dataset holds image paths, so no image is decoded to measure lengths
    trainer = SimpleNamespace(args=args, train_dataset=dataset.dataset)
    order = list(training.MMPhiTrainerMixin._get_train_sampler(trainer))
    assert sorted(order) == list(range(len(dataset)))
    random_order = random.Random(0).sample(range(len(dataset)), len(dataset))
    grouped = md.padding_fraction(dataset.lengths, 4, order)
    assert grouped < md.padding_fraction(dataset.lengths, 4, random_order)


def test_length_grouped_order_depends_on_the_seed_and_global_batch_not_the_process_count():
    from types import SimpleNamespace

    rng = random.Random(7)
    lengths = [rng.randint(10, 300) for _ in range(4000)]  # several megabatches

    def order(per_device, processes, accumulation, seed=42):
        args = SimpleNamespace(per_device_train_batch_size=per_device, world_size=processes,
                               gradient_accumulation_steps=accumulation, seed=seed, data_seed=None)
        return list(training.length_grouped_sampler(lengths, args))

    one_process = order(8, 1, 2)
    assert one_process == order(4, 2, 2) == order(2, 4, 2) == order(8, 1, 2)  # global batch 16 each time
    assert order(8, 1, 2, seed=43) != one_process
    assert order(8, 1, 4) != one_process  # another global batch groups differently


def test_length_grouped_order_of_an_epoch_is_the_same_when_resumed_there():
    """The order of epoch N comes from seed + N: a run resumed in epoch 1 draws what the uninterrupted run drew."""
    from types import SimpleNamespace

    lengths = [random.Random(3).randint(10, 300) for _ in range(500)]
    args = SimpleNamespace(per_device_train_batch_size=4, world_size=1, gradient_accumulation_steps=1, seed=5,
                           data_seed=None)
    uninterrupted = training.length_grouped_sampler(lengths, args)
    epoch_0 = list(uninterrupted)
    uninterrupted.set_epoch(1)
    epoch_1 = list(uninterrupted)
    resumed = training.length_grouped_sampler(lengths, args)
    resumed.set_epoch(1)
    assert list(resumed) == epoch_1 != epoch_0
    resumed.set_epoch(0)
    assert list(resumed) == epoch_0


# --- splits ------------------------------------------------------------------------------------------------------


def test_split_by_image_keeps_every_image_on_one_side(synthetic):
    captions = md.read_source(synthetic["captions_train"], synthetic["images"])
    train, val = md.split_by_image(captions, 0.3)
    assert not {c.image for c in train} & {c.image for c in val} and train and val
    shuffled = random.Random(1).sample(captions, len(captions))
    assert {c.id for c in md.split_by_image(shuffled, 0.3)[1]} == {c.id for c in val}


# --- bad input ---------------------------------------------------------------------------------------------------

BAD_LLAVA = [
    ({"id": "r1", "image": "nowhere.png", "conversations": turns(("<image>\nQ?", "A"))}, "image file not found"),
    ({"id": "r1", "image": "red.png"}, 'no "conversations"'),
    ({"id": "r1", "conversations": [{"from": "human", "value": "Q"}, {"from": "human", "value": "Q2"}]},
     "do not alternate"),
    ({"id": "r1", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
     "do not alternate"),
    ({"id": "r1", "conversations": turns(("Q", "  "))}, "empty answer"),
    ({"id": "r1", "conversations": [{"from": "human", "value": "Q"}]}, "without a gpt answer"),
    ({"id": "r1", "conversations": turns(("<image>\nQ", "A"))}, 'has <image> but the record has no "image"'),
    ({"id": "r1", "image": "red.png", "conversations": turns(("Q", "A"), ("<image> Q", "A"))}, "only the first"),
    ({"id": "r1", "image": "red.png", "conversations": turns(("<image>\nQ", "an <image> of a cat"))},
     "answer 0 holds <image>, which the tokenizer reads as a control token"),
    ({"id": "r1", "conversations": turns(("Q", "yes"), ("Q2", "done<|endoftext|>more"))},
     "answer 1 holds <|endoftext|>"),
    ({"id": "r1", "conversations": turns(("say <pad>", "ok"))}, "question 0 holds <pad>"),
]


@pytest.mark.parametrize("record,problem", BAD_LLAVA)
def test_bad_llava_records_name_file_record_and_problem(tmp_path, record, problem):
    red_png(tmp_path)
    good = {"id": "ok", "image": "red.png", "conversations": turns(("<image>\nWhat colour?", "red"))}
    path = llava_file(tmp_path, [good, record])
    with pytest.raises(md.BadRecordError) as caught:
        read_llava(path, str(tmp_path))
    message = str(caught.value)
    assert path in message and "record 1 (id=r1)" in message and problem in message
    report = md.SkipReport()
    kept = read_llava(path, str(tmp_path), skip_bad_records=True, report=report)
    assert [c.id for c in kept] == ["ok"] and report.total == 1 and problem in report.summary()


BAD_COCO = [
    ({"image_id": 99, "caption": "a cat"}, "caption for unknown image id 99"),
    ({"image_id": 1, "caption": ""}, "empty caption"),
    ({"caption": "a cat"}, 'no "image_id"'),
    ({"image_id": 1, "caption": "a cat<|endoftext|>"}, "the caption holds <|endoftext|>"),
]


@pytest.mark.parametrize("annotation,problem", BAD_COCO)
def test_bad_coco_annotations(tmp_path, annotation, problem):
    red_png(tmp_path)
    data = {"images": [{"id": 1, "file_name": "red.png"}],
            "annotations": [{"id": 1, "image_id": 1, "caption": "a red square"}, {"id": 7, **annotation}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    with pytest.raises(md.BadRecordError, match=r"captions.json: annotations\[1\] \(id=7\): .*" + problem):
        coco_images(str(path), str(tmp_path))
    report = md.SkipReport()
    images = coco_images(str(path), str(tmp_path), skip_bad_records=True, report=report)
    assert report.total == 1 and images[0].captions == ["a red square"]


def test_a_coco_file_is_read_without_datasets_logging_an_error(tmp_path):
    """datasets' JSON builder cannot read a COCO file (one object of lists, past arrow's first block) as rows and logs
    an ERROR before it raises; the file is read anyway, so nothing may be logged."""
    red_png(tmp_path)
    captions = [{"id": i, "image_id": 1, "caption": f"a red square, caption {i}"} for i in range(6000)]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"info": {"description": "COCO 2017"}, "licenses": [],
                                "images": [{"id": 1, "file_name": "red.png"}], "annotations": captions}, indent=1))
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = seen.append
    library_logger = logging.getLogger("datasets")
    library_logger.addHandler(handler)
    try:
        images = coco_images(str(path), str(tmp_path))
    finally:
        library_logger.removeHandler(handler)
    assert len(images[0].captions) == 6000
    assert not [record.getMessage() for record in seen]


@pytest.mark.parametrize("name", ["llava.json.gz", "llava.jsonl.gz", "llava.json.bz2", "llava.json.xz",
                                  "llava.json.zst"])
def test_a_cut_off_or_mislabelled_compressed_file_is_named(tmp_path, name):
    """Never the prefix before the cut, never the decompressor's bare EOFError: the file and what is wrong."""
    red_png(tmp_path)
    records = [{"id": str(i), "image": "red.png", "conversations": turns(("<image>\nColour?", "red " * 20))}
               for i in range(3000)]
    text = "\n".join(map(json.dumps, records)) if ".jsonl" in name else json.dumps(records)
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": zstandard.open}[os.path.splitext(name)[1]]
    whole = tmp_path / name
    with opener(whole, "wt") as handle:
        handle.write(text)
    assert len(read_llava(str(whole), str(tmp_path))) == 3000
    data = whole.read_bytes()
    (tmp_path / ("cut_" + name)).write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / ("plain_" + name)).write_text(text)
    for bad, problem in (("cut_" + name, "cut short"), ("plain_" + name, "not")):
        with pytest.raises(md.BadRecordError, match=rf"{bad}: cannot decompress it as .*{problem}"):
            read_llava(str(tmp_path / bad), str(tmp_path))


def test_malformed_files_are_clear_errors(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1,')
    with pytest.raises(md.BadRecordError, match="broken.json: malformed JSON"):
        read_llava(str(broken))
    deep = tmp_path / "deep.json"
    deep.write_text('[{"id": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}]")
    with pytest.raises(md.BadRecordError, match="deep.json: JSON nested too deeply to read"):
        read_llava(str(deep))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        coco_images(str(tmp_path / "missing.json"))
    with pytest.raises(md.BadRecordError, match=r"empty\.json: not a COCO captions file \(data_format "
                                                r"'coco_captions' expects .*; found no records\)"):
        coco_images(llava_file(tmp_path, [], "empty.json"))
    red_png(tmp_path)
    llava = llava_file(tmp_path, [{"id": "a", "image": "red.png", "conversations": turns(("<image>\nQ", "A"))}])
    with pytest.raises(md.BadRecordError, match=r"llava\.json: not a COCO captions file .*"
                                                r"found columns \['conversations', 'id', 'image'\]"):
        coco_images(llava)
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "red.png"}], "annotations": []}))
    with pytest.raises(md.BadRecordError, match=r"captions\.json: not a LLaVA file .*found columns \['annotations', "
                                                r"'images'\]"):
        read_llava(str(coco))


def truncated_png(folder, name="truncated.png"):
    path = os.path.join(folder, name)
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return name


def test_truncated_image_found_by_validation_and_named_at_load(tiny, tmp_path):
    _, processor = tiny
    red_png(tmp_path)
    records = [{"id": "ok", "image": "red.png", "conversations": turns(("<image>\nColour?", "red"))},
               {"id": "cut", "image": truncated_png(tmp_path), "conversations": turns(("<image>\nColour?", "red"))},
               {"id": "text", "conversations": turns(("Hi", "hello"))}]
    path = llava_file(tmp_path, records)
    n_good, report = md.validate_source(path, str(tmp_path))
    assert n_good == 2 and report.total == 1 and "record 1 (id=cut)" in report.examples[0]
    assert "truncated" in report.examples[0]

    conversations = read_llava(path, str(tmp_path))  # file exists: only a decode finds the problem
    rows = list(md.encode_conversations(conversations, processor).dataset)
    with pytest.raises(md.BadRecordError, match=r"record 1 \(id=cut\): cannot read image .*truncated.png"):
        md.MMPhiDataCollator(processor)(rows)
    lenient = md.MMPhiDataCollator(processor, skip_bad_records=True)
    batch = lenient(rows)  # the bad sample is left out of the batch, and the skip is counted
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 1 and lenient.skipped.total == 1


def test_validation_exit_status(tmp_path, capsys):
    red_png(tmp_path)
    records = [{"id": "ok", "image": "red.png", "conversations": turns(("<image>\nColour?", "red"))}]
    assert md.validation_exit("f.json", *md.validate_source(llava_file(tmp_path, records), str(tmp_path))) == 0
    records.append({"id": "bad", "conversations": turns(("Q", ""))})
    assert md.validation_exit("f.json", *md.validate_source(llava_file(tmp_path, records), str(tmp_path))) == 1
    assert "1 bad" in capsys.readouterr().out


# --- cached vision features --------------------------------------------------------------------------------------


def test_vision_feature_cache_round_trip_and_reuse(tiny, synthetic, tmp_path):
    model, processor = tiny
    images = coco_images(synthetic["captions_val"], synthetic["images"])
    paths = [i.image for i in images]
    store = md.cache_vision_features(model, processor, paths, str(tmp_path / "cache"), batch_size=4, shard_size=3)
    assert len(store) == len(paths) and len(list((tmp_path / "cache").glob("*.safetensors"))) == -(-len(paths) // 3)
    pixel_values = processor.image_processor([md.load_image(paths[4])], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.model.get_vision_features(pixel_values)
    torch.testing.assert_close(store.get(paths[4]), expected)

    index = tmp_path / "cache" / "index.json"
    stamp = index.stat().st_mtime_ns
    md.cache_vision_features(model, processor, paths, str(tmp_path / "cache"))
    assert index.stat().st_mtime_ns == stamp  # same tower: reused
    changed, _ = build_tiny(seed=5)
    md.cache_vision_features(changed, processor, paths, str(tmp_path / "cache"))
    assert index.stat().st_mtime_ns != stamp  # another tower: recomputed
    with pytest.raises(md.BadRecordError, match="no cached vision features"):
        store.get("/elsewhere/x.png")


def test_vision_feature_cache_is_extended_not_rewritten_for_more_images(tiny, synthetic, tmp_path):
    """Instruct given the projector stage's folder with images it did not cover: the projector's shards stay as
    written (it can still read them) and only the new images are computed, into shards after them."""
    model, processor = tiny
    paths = sorted(i.image for i in coco_images(synthetic["captions_val"], synthetic["images"]))
    first = md.cache_vision_features(model, processor, paths[:4], str(tmp_path / "cache"), shard_size=3)
    shards = sorted((tmp_path / "cache").glob("*.safetensors"))
    stamps = [shard.stat().st_mtime_ns for shard in shards]
    store = md.cache_vision_features(model, processor, paths, str(tmp_path / "cache"), shard_size=3)
    assert [shard.stat().st_mtime_ns for shard in shards] == stamps
    assert len(store) == len(paths) and all(store.rows[p] == first.rows[p] for p in paths[:4])
    assert {store.rows[p][0] for p in paths[4:]}.isdisjoint(s.name for s in shards)
    for path in (paths[1], paths[-1]):
        pixel_values = processor.image_processor([md.load_image(path)], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            torch.testing.assert_close(store.get(path), model.model.get_vision_features(pixel_values))


def test_collator_counts_are_summed_over_processes(tiny, monkeypatch):
    """Under DDP each process collates its own batches: `gather_collator_counts` gives every process the sums (here
    the gather of a second process's counts is stood in for; the two-process runs in test_multiprocess go through
    accelerate's)."""
    from types import SimpleNamespace

    import accelerate.utils

    _, processor = tiny
    mine, other = md.MMPhiDataCollator(processor), md.MMPhiDataCollator(processor)
    mine.token_counts, other.token_counts = {"train": [90, 10], "eval": [5, 0]}, {"train": [60, 40], "eval": [0, 0]}
    mine.skipped.add("f.json: record 1", "cannot read image a.png")
    other.skipped.add("f.json: record 9", "cannot read image b.png")
    held = mine.skipped
    monkeypatch.setattr(accelerate.utils, "gather_object",
                        lambda objects: [*objects, (other.token_counts, other.skipped)])
    md.gather_collator_counts(SimpleNamespace(data_collator=mine, args=SimpleNamespace(world_size=2)))
    assert mine.token_counts == {"train": [150, 50], "eval": [5, 0]} and mine.padding_fraction == 0.25
    assert held is mine.skipped and held.total == 2 and len(held.examples) == 2


def features_of(model, processor, path):
    pixel_values = processor.image_processor([md.load_image(path)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.model.get_vision_features(pixel_values)


def test_vision_feature_cache_follows_replaced_and_repaired_images(tiny, synthetic, tmp_path):
    """Entries are keyed by the file as it is (size + mtime): a replaced image gets new features, a repaired one
    leaves the unreadable list; unchanged images are not recomputed."""
    import shutil

    model, processor = tiny
    sources = sorted(i.image for i in coco_images(synthetic["captions_val"], synthetic["images"]))[:4]
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [str(shutil.copy(source, folder / f"{n}.png")) for n, source in enumerate(sources)]
    Path(paths[3]).write_bytes(Path(sources[3]).read_bytes()[:100])  # broken
    store = md.cache_vision_features(model, processor, paths, str(tmp_path / "cache"), shard_size=2)
    assert os.path.abspath(paths[3]) in store.unreadable
    first_shards = {store.rows[os.path.abspath(p)][0] for p in paths[:3]}

    shutil.copy(sources[1], paths[0])  # replaced by another picture
    os.utime(paths[0], ns=(1, 10**18))  # a clearly different mtime, whatever the file system's resolution
    shutil.copy(sources[3], paths[3])  # repaired
    store = md.cache_vision_features(model, processor, paths, str(tmp_path / "cache"), shard_size=2)
    assert not store.unreadable and len(store) == 4
    for path in paths:
        torch.testing.assert_close(store.get(path), features_of(model, processor, path))
    torch.testing.assert_close(store.get(paths[0]), features_of(model, processor, sources[1]))
    assert store.rows[os.path.abspath(paths[2])][0] in first_shards  # unchanged: not recomputed


def test_an_interrupted_run_with_another_tower_never_rewrites_the_cache_it_found(tiny, synthetic, tmp_path,
                                                                                  monkeypatch):
    """Tower B in tower A's folder, stopped before its index: A's index and shards are untouched, so A's next run
    reads A's features. B's finished run points the index at B's own shards and removes the ones nothing indexes."""
    import mmphi.data.features as features

    model, processor = tiny
    other, _ = build_tiny(seed=5)
    paths = sorted(i.image for i in coco_images(synthetic["captions_val"], synthetic["images"]))[:6]
    cache = tmp_path / "cache"
    md.cache_vision_features(model, processor, paths, str(cache), shard_size=2)
    before = {shard.name: shard.read_bytes() for shard in cache.glob("*.safetensors")}

    def stop(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(features, "_write_unreadable", stop)
    with pytest.raises(KeyboardInterrupt):
        md.cache_vision_features(other, processor, paths, str(cache), shard_size=2)
    monkeypatch.undo()
    assert all((cache / name).read_bytes() == data for name, data in before.items())
    store = md.cache_vision_features(model, processor, paths, str(cache), shard_size=2)
    for path in paths:
        torch.testing.assert_close(store.get(path), features_of(model, processor, path))

    store = md.cache_vision_features(other, processor, paths, str(cache), shard_size=2)
    for path in paths:
        torch.testing.assert_close(store.get(path), features_of(other, processor, path))
    assert {shard.name for shard in cache.glob("*.safetensors")} == {row[0] for row in store.rows.values()}
    assert not set(before) & {row[0] for row in store.rows.values()}


def test_vision_feature_cache_names_unreadable_images_and_leaves_them_out(tiny, synthetic, tmp_path):
    model, processor = tiny
    paths = [i.image for i in coco_images(synthetic["captions_val"], synthetic["images"])][:4]
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(paths[0]).read_bytes()[:100])
    store = md.cache_vision_features(model, processor, [*paths, str(broken)], str(tmp_path / "cache"), batch_size=2)
    assert len(store) == len(paths) and str(broken) not in store
    with pytest.raises(md.BadRecordError, match="cannot read image .*broken.png"):
        store.get(str(broken))
    rows = list(md.encode_conversations(
        [md.Conversation("bad", str(broken), [md.Turn("Q?", "A")], location="f.json: record 7")], processor).dataset)
    with pytest.raises(md.BadRecordError, match=r"f.json: record 7: cannot read image"):
        md.MMPhiDataCollator(processor, vision_features=store)(rows)
