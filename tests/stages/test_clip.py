"""The clip stage (scripts/clip.py), a tiny CLIP, the offline stand-in for TinyCLIP: CPU, seconds per test."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import CLIPModel, PhiConfig, PhiForCausalLM

from configuration_mmphi import TINY_TEXT_CONFIG
from mmphi.build import build_tiny, init_tower_positions, sincos_position_embeddings, tiny_tokenizer
from mmphi.build import main as build_main
from mmphi.data import BadRecordError, captioned_images, read_source
from mmphi.data.synthetic import generate
from mmphi.stages.clip import ClipCollator, ImageCaptionDataset, build_trainer, main, new_tiny_clip, parse_args
from modeling_mmphi import MMPhiForCausalLM


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("clip") / "data"), num_images=24, val_fraction=0.0, seed=0)


def coco_images(data):
    return captioned_images(read_source(data["captions_train"], data["images"], data_format="coco_captions"))


def clip_argv(data, output_dir, *extra):
    return ["--data_path", data["captions_train"], "--image_folder", data["images"], "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--max_steps", "50",
            "--learning_rate", "2e-3", "--warmup_steps", "0", "--save_strategy", "no", "--logging_steps", "1",
            "--val_fraction", "0.25", "--seed", "0", "--disable_tqdm", "true", *extra]


def test_contrastive_training_learns_and_the_tower_builds_mmphi(data, tmp_path):
    metrics = main(clip_argv(data, tmp_path / "clip"))
    log = [entry["loss"] for entry in json.loads((tmp_path / "clip" / "trainer_state.json").read_text())["log_history"]
           if "loss" in entry]
    # the in-batch contrastive loss falls as images and their captions find each other
    assert log[0] > 1.5 and sum(log[-5:]) / 5 < 0.5 * log[0]
    assert metrics["skipped_bad_records"] == 0 and "eval_loss" in metrics
    for name in ("model.safetensors", "config.json", "tokenizer.json", "processor_config.json"):
        assert (tmp_path / "clip" / name).exists(), name

    # build_model takes the trained tower, as the real recipe takes TinyCLIP's
    phi = PhiForCausalLM(PhiConfig(**TINY_TEXT_CONFIG))
    phi.save_pretrained(tmp_path / "phi")
    tiny_tokenizer().save_pretrained(tmp_path / "phi")
    build_main(["--vision_model", str(tmp_path / "clip"), "--text_model", str(tmp_path / "phi"),
                "--vision_feature_select_strategy", "full", "--output_dir", str(tmp_path / "mmphi")])
    trained = CLIPModel.from_pretrained(tmp_path / "clip").vision_model.state_dict()
    built = MMPhiForCausalLM.from_pretrained(str(tmp_path / "mmphi")).model.vision_tower.state_dict()
    fresh = new_tiny_clip(seed=0)[0].vision_model.state_dict()
    name = "embeddings.patch_embedding.weight"
    assert not torch.equal(trained[name], fresh[name])
    for key, tensor in trained.items():
        torch.testing.assert_close(built[key], tensor, msg=key)


def test_caption_ids_end_in_eos_where_clip_reads_the_text_embedding():
    tokenizer = new_tiny_clip(seed=0)[1].tokenizer
    items = [{"caption": "Three large red squares.", "pixel_values": torch.zeros(3, 4, 4)},
             {"caption": "A picture of a small blue circle in the top left.", "pixel_values": torch.zeros(3, 4, 4)}]
    batch = ClipCollator(tokenizer, max_length=6)(items)
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == 6 and lengths.tolist()[1] == 6  # the long caption is cut ...
    for row, length in enumerate(lengths.tolist()):
        assert batch["input_ids"][row, length - 1] == tokenizer.eos_token_id  # ... and still ends in EOS
        assert (batch["input_ids"][row, : length - 1] != tokenizer.eos_token_id).all()
    assert batch["return_loss"] is True and batch["pixel_values"].shape == (2, 3, 4, 4)


def test_each_image_is_served_with_one_of_its_own_captions(data):
    images = coco_images(data)
    dataset = ImageCaptionDataset(images, new_tiny_clip(seed=0)[1].image_processor)
    for index in range(4):
        item = dataset[index]
        assert item["caption"] in images[index].captions and item["pixel_values"].shape == (3, 224, 224)


def test_a_missing_image_names_its_record_or_is_counted_when_skipping(data, tmp_path):
    images = coco_images(data)[:3]
    missing = tmp_path / "gone.png"
    images[1].image = str(missing)
    processor = new_tiny_clip(seed=0)[1].image_processor
    with pytest.raises(BadRecordError, match=r"images\[\d+\].*gone\.png.*--skip_bad_records"):
        ImageCaptionDataset(images, processor)[1]
    skipping = ImageCaptionDataset(images, processor, skip_bad_records=True)
    assert skipping[1]["caption"] in images[2].captions and skipping.skipped.total == 1
    assert os.path.basename(str(missing)) in skipping.skipped.examples[0]


def test_cached_pixels_are_served_from_memory_after_the_first_epoch(data, tmp_path):
    images = coco_images(data)[:2]
    copy = tmp_path / "copy.png"
    copy.write_bytes(Path(images[0].image).read_bytes())
    images[0].image = str(copy)
    processor = new_tiny_clip(seed=0)[1].image_processor
    cached, plain = ImageCaptionDataset(images, processor, cache_pixels=True), ImageCaptionDataset(images, processor)
    first = cached[0]["pixel_values"]
    torch.testing.assert_close(first, plain[0]["pixel_values"], rtol=0, atol=0)
    copy.write_bytes(Path(images[1].image).read_bytes())  # the file changes on disk after the first epoch
    assert torch.equal(cached[0]["pixel_values"], first)  # served from memory
    assert not torch.equal(plain[0]["pixel_values"], first)  # read again


def test_caching_pixels_trains_the_same_tiny_clip(data, tmp_path):
    # 18 training images, batch 8: 12 steps are four epochs, three of them from the cache
    argv = ["--max_steps", "12", "--logging_steps", "4"]
    main(clip_argv(data, tmp_path / "plain", *argv))
    main(clip_argv(data, tmp_path / "cached", *argv, "--cache_pixels"))
    plain = (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert (tmp_path / "cached" / "model.safetensors").read_bytes() == plain


@pytest.mark.parametrize("persistent", [False, True])
def test_caching_pixels_in_workers_that_restart_each_epoch_is_warned(data, tmp_path, caplog, persistent):
    argv = clip_argv(data, tmp_path / "clip", "--cache_pixels", "--dataloader_num_workers", "2",
                     "--dataloader_persistent_workers", str(persistent).lower())
    with caplog.at_level("WARNING"):
        build_trainer(*parse_args(argv))
    assert ("dropped at the end of every epoch" in caplog.text) == (not persistent)


def closest_patches_apart(tower) -> float:
    """On a one-colour image (only the position tells patches apart): the smallest distance between two patch tokens,
    relative to their mean norm."""
    with torch.no_grad():
        patches = tower(pixel_values=torch.ones(1, 3, 224, 224)).last_hidden_state[0, 1:]
    return (torch.cdist(patches, patches).fill_diagonal_(float("inf")).min() / patches.norm(dim=-1).mean()).item()


def test_a_new_tiny_tower_tells_its_patches_apart_by_position():
    """The random tiny tower starts from 2-D sin-cos position embeddings: on a blank image its patch tokens differ
    by where they lie (with CLIP's random init, std 0.02, they were nearly identical, and the tiny pipeline could not
    answer "Where is the circle?"). Both ways to get a tiny tower (MM-Phi's build and the tiny CLIP) start so."""
    table = sincos_position_embeddings(4, 64)
    assert table.shape == (16, 64) and torch.cdist(table, table).fill_diagonal_(1.0).min() > 0.5
    for tower in (build_tiny()[0].model.vision_tower, new_tiny_clip(0)[0].vision_model):
        assert torch.equal(tower.embeddings.position_embedding.weight[0], torch.zeros(64))  # CLS has no place
        assert closest_patches_apart(tower) > 0.1
    plain = CLIPModel(new_tiny_clip(0)[0].config).vision_model  # CLIP's own init, for contrast
    assert closest_patches_apart(plain) < 0.1
    init_tower_positions(plain)
    assert closest_patches_apart(plain) > 0.1
