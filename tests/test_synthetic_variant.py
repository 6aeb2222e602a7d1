"""The second shapes generator: unlike ours (64 px, free placement, other shapes and colours, negated yes/no),
yet in the same formats, with answers that follow its scenes."""

import json
from pathlib import Path

from PIL import Image

import mmphi.data as md
from mmphi.data import synthetic_variant as variant


def test_variant_data_is_readable_and_its_answers_follow_the_scenes(tmp_path):
    paths = variant.generate(str(tmp_path), num_images=40, val_fraction=0.25, seed=1)
    scenes = {s["file_name"]: s for s in json.loads(Path(paths["scenes"]).read_text())}
    assert {s["shape"] for s in scenes.values()} <= set(variant.SHAPES)
    assert {s["colour"] for s in scenes.values()} <= set(variant.COLOURS)
    assert Image.open(Path(paths["images"]) / next(iter(scenes))).size == (64, 64)
    conversations = md.read_source(paths["llava_train"], paths["images"])
    assert len(md.captioned_images(md.read_source(paths["captions_train"], paths["images"]))) == 30
    negated = 0
    for conversation in conversations:
        if conversation.image is None:
            continue
        scene = scenes[Path(conversation.image).name]
        for turn in conversation.turns:
            if turn.question_type in ("colour", "shape", "size"):
                assert turn.answer == scene[turn.question_type]
            if turn.question_type == "yes/no":
                asked = next(word for word in (*variant.COLOURS, *variant.SHAPES) if f" {word}" in turn.question)
                there = asked in (scene["colour"], scene["shape"])
                is_negated = " not " in turn.question
                negated += is_negated
                assert turn.answer == ("yes" if there != is_negated else "no"), (turn, scene)
    assert negated > 0
    assert variant.generate(str(tmp_path / "again"), num_images=40, val_fraction=0.25, seed=1)  # deterministic
    assert Path(tmp_path / "again" / "scenes.json").read_text() == Path(paths["scenes"]).read_text()
