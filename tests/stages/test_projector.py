"""The projector stage (scripts/projector.py) on the tiny default and a few synthetic images: CPU, seconds per test."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from configuration_mmphi import MMPhiConfig
from mmphi.build import build_tiny, save_mmphi
from mmphi.data.synthetic import generate
from mmphi.errors import BadRecordError
from mmphi.stages.projector import build_trainer, freeze_for_training, main, parse_args
from modeling_mmphi import MMPhiForCausalLM


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("projector")
    data = generate(str(root / "data"), num_images=16, val_fraction=0.25, seed=0)
    model, processor = build_tiny(seed=0)
    save_mmphi(model, processor, str(root / "base"))
    return root, data


def projector_argv(root, data, output_dir, *extra):
    return ["--model_name_or_path", str(root / "base"), "--data_path", data["captions_train"],
            "--image_folder", data["images"], "--output_dir", str(output_dir), "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "8", "--gradient_accumulation_steps", "1", "--max_steps", "2",
            "--optim", "adamw_torch", "--gradient_checkpointing", "false", "--save_strategy", "no",
            "--logging_steps", "1", "--val_fraction", "0.25", "--max_eval_samples", "8", "--seed", "0", *extra]


def build(root, data, output_dir, *extra):
    return build_trainer(*parse_args(projector_argv(root, data, output_dir, *extra)))


def test_only_the_projector_is_trainable_and_optimized(setup, tmp_path):
    root, data = setup
    stage = build(root, data, tmp_path / "out", "--optim", "paged_adamw_8bit")  # the stage default optimizer
    trainable = {name for name, p in stage.model.named_parameters() if p.requires_grad}
    assert trainable == {"model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias"}
    optimizer = stage.trainer.create_optimizer()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in stage.model.parameters() if p.requires_grad}


def test_training_turns_the_language_models_cache_off_too(setup, tmp_path):
    """Both configs off while training (the Trainer sets only the top one; the language model reads its own and
    would warn at the first checkpointed step)."""
    root, data = setup
    stage = build(root, data, tmp_path / "out", "--gradient_checkpointing", "true")
    config = stage.trainer.model.config
    assert config.use_cache is False and config.text_config.use_cache is False


@pytest.mark.parametrize("feature_layer", [-1, -2, [0, -2]])
def test_train_vision_tower_flag_keeps_the_language_model_frozen_and_every_trainable_tensor_gets_a_gradient(
    feature_layer,
):
    """DistributedDataParallel refuses trainable parameters without a gradient: the tower's pooler layer norm and
    the layers after the feature layer must be frozen too."""
    model, processor = build_tiny(seed=0, vision_feature_layer=feature_layer)
    trainable = freeze_for_training(model, train_vision_tower=True)
    assert any(n.startswith("model.vision_tower.") for n in trainable)
    assert all(n.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for n in trainable)
    assert not any("post_layernorm" in n for n in trainable)
    if feature_layer == -2:
        assert not any(n.startswith("model.vision_tower.encoder.layers.1.") for n in trainable)
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    batch = processor(text=["<image>\na red square"], images=[image], return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    without_gradient = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without_gradient == []


def test_train_language_model_flag_trains_the_whole_language_model_and_leaves_the_tower_frozen():
    model, _ = build_tiny(seed=0)
    trainable = set(freeze_for_training(model, train_language_model=True))
    language_model = {n for n, _ in model.named_parameters() if n.startswith(("model.language_model.", "lm_head."))}
    assert language_model <= trainable
    assert not any(n.startswith("model.vision_tower.") for n in trainable)
    assert trainable - language_model == {"model.multi_modal_projector.linear_1.weight",
                                          "model.multi_modal_projector.linear_1.bias"}


def test_training_changes_only_the_projector_and_saves_a_loadable_folder(setup, tmp_path):
    root, data = setup
    output_dir = tmp_path / "out"
    metrics = main(projector_argv(root, data, output_dir, "--learning_rate", "1e-2"))
    assert metrics["train_loss"] > 0 and "eval_loss" in metrics and metrics["skipped_bad_records"] == 0
    before = load_file(str(root / "base" / "model.safetensors"))
    after = load_file(str(output_dir / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias"}
    for name in ("config.json", "modeling_mmphi.py", "processor_config.json", "chat_template.jinja"):
        assert (output_dir / name).exists(), name
    config = json.loads((output_dir / "config.json").read_text())  # training turned the cache off in memory only
    assert config["use_cache"] is True and config["text_config"]["use_cache"] is True
    assert json.loads((output_dir / "generation_config.json").read_text())["use_cache"] is True
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(output_dir), trust_remote_code=True)
    assert type(loaded).__name__ == "MMPhiForCausalLM"
    torch.testing.assert_close(loaded.model.multi_modal_projector.linear_1.weight,
                               after["model.multi_modal_projector.linear_1.weight"])


def test_ctrl_c_saves_a_checkpoint_that_training_resumes_from(setup, tmp_path):
    """An interrupt at step 2 of 4 (no saves asked for): checkpoint-2 is written and named; `latest` resumes it and
    training ends at step 4."""
    from transformers import TrainerCallback

    from mmphi.training import train_and_evaluate

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    out = tmp_path / "out"
    stage = build(*setup, out, "--max_steps", "4")
    stage.trainer.add_callback(CtrlC())
    with pytest.raises(KeyboardInterrupt, match=r"at step 2: saved .*checkpoint-2; continue with "
                                                r"--resume_from_checkpoint latest"):
        train_and_evaluate(stage)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    main(projector_argv(*setup, out, "--max_steps", "4", "--resume_from_checkpoint", "latest"))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry][-2:] == [3, 4]  # resumed at 2


def test_validation_is_split_by_image(setup, tmp_path):
    root, data = setup
    stage = build(root, data, tmp_path / "out")
    train_images = set(stage.train.dataset["image"])
    eval_images = set(stage.evaluation.dataset["image"])
    assert train_images and eval_images and not train_images & eval_images
    with pytest.raises(ValueError, match="in both the training and the eval data"):
        build(root, data, tmp_path / "out2", "--eval_data_path", data["captions_train"],
              "--eval_image_folder", data["images"])


def test_cached_and_uncached_features_give_the_same_losses(setup, tmp_path, monkeypatch):
    root, data = setup
    monkeypatch.setenv("MMPHI_CACHE", str(tmp_path / "cache"))
    losses = {}
    small = ("--per_device_train_batch_size", "2", "--max_eval_samples", "4")
    for mode, extra in (("pixels", small), ("cached", (*small, "--cache_vision_features"))):
        stage = build(root, data, tmp_path / mode, *extra)
        eval_loss = stage.trainer.evaluate()["eval_loss"]
        stage.trainer.train()
        losses[mode] = [eval_loss] + [log["loss"] for log in stage.trainer.state.log_history if "loss" in log]
    assert len(losses["cached"]) == 3
    assert losses["cached"] == pytest.approx(losses["pixels"], rel=1e-4)
    # the cache lives outside output_dir (checkpoints and pushes never carry it), keyed by tower and image set
    cache = Path(stage.collator.vision_features.directory)
    assert cache.parent == tmp_path / "cache" / "vision_features"
    assert not list((tmp_path / "cached").rglob("*.safetensors"))
    assert list(cache.glob("*.safetensors")) and json.loads((cache / "index.json").read_text())["rows"]


def test_training_loss_skips_the_logits_and_equals_the_full_loss(setup, tmp_path):
    """A training step asks the model for its loss without logits (`skip_logits`): the LM head runs on the caption
    tokens only, with the loss and gradients of the full logits. Evaluation still gets the logits."""
    from transformers import Trainer

    root, data = setup
    trainer = build(root, data, tmp_path / "out", "--train_language_model").trainer
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] != -100).sum() < batch["attention_mask"].sum()  # the image tokens carry no label
    calls = []
    hook = trainer.model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs.get("skip_logits")),
                                                   with_kwargs=True)
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    results = {}
    for name, compute_loss in (("stage", type(trainer).compute_loss), ("full", Trainer.compute_loss)):
        trainer.model.zero_grad()
        loss = compute_loss(trainer, trainer.model, dict(batch))
        loss.backward()
        results[name] = (loss.detach(), [p.grad.clone() for p in trained])
    _, outputs = type(trainer).compute_loss(trainer, trainer.model, dict(batch), return_outputs=True)
    hook.remove()
    assert calls == [True, None, None] and outputs.logits is not None
    torch.testing.assert_close(results["stage"][0], results["full"][0], rtol=1e-5, atol=1e-6)
    for ours, full in zip(results["stage"][1], results["full"][1], strict=True):
        torch.testing.assert_close(ours, full, rtol=1e-4, atol=1e-6)
    # a loss-only evaluation step takes the same path: the loss of Trainer's step, no logits built
    calls.clear()
    hook = trainer.model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs.get("skip_logits")),
                                                   with_kwargs=True)
    loss, logits, labels = type(trainer).prediction_step(trainer, trainer.model, dict(batch), True)
    hook.remove()
    expected = Trainer.prediction_step(trainer, trainer.model, dict(batch), True)[0]
    assert calls == [True] and logits is None and labels is None
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_cached_features_with_a_trained_tower_is_an_error(setup, tmp_path):
    root, data = setup
    with pytest.raises(ValueError, match="needs a frozen tower"):
        build(root, data, tmp_path / "out", "--cache_vision_features", "--train_vision_tower")


def test_cached_features_under_deepspeed_zero3_is_an_error_naming_the_fix(setup, tmp_path, monkeypatch):
    """Under ZeRO-3 (`zero3_init_flag`) the tower's weights are split across the processes before the cache pass
    could run them: each process holds empty placeholders, as faked here."""
    from mmphi.stages import projector

    loaded = projector.load_model

    def split_tower(*args, **kwargs):
        model = loaded(*args, **kwargs)
        for param in model.model.vision_tower.parameters():
            param.data = torch.empty(0, dtype=param.dtype)
        return model

    monkeypatch.setattr(projector, "load_model", split_tower)
    root, data = setup
    with pytest.raises(ValueError, match="ZeRO-3 .* pass --cache_vision_features false"):
        build(root, data, tmp_path / "out", "--cache_vision_features")


def test_validate_data_scans_images_and_exits(setup, tmp_path, capsys):
    root, data = setup
    argv = projector_argv(root, data, tmp_path / "out", "--validate_data")
    with pytest.raises(SystemExit) as clean:
        main(argv)
    assert clean.value.code == 0 and "OK" in capsys.readouterr().out

    images = tmp_path / "images"
    shutil.copytree(data["images"], images)
    first_training_image = json.loads(Path(data["captions_train"]).read_text())["images"][0]["file_name"]
    victim = images / first_training_image
    Image.effect_noise((224, 224), 60).convert("RGB").save(victim)
    victim.write_bytes(victim.read_bytes()[:2000])  # truncated PNG: the file exists, only decoding finds it
    argv[argv.index("--image_folder") + 1] = str(images)
    with pytest.raises(SystemExit) as dirty:
        main(argv)
    out = capsys.readouterr().out
    assert dirty.value.code == 1 and victim.name in out and "1 bad" in out


def test_runs_without_a_validation_split(setup, tmp_path):
    root, data = setup
    output_dir = tmp_path / "out"
    metrics = main(projector_argv(root, data, output_dir, "--max_steps", "1", "--val_fraction", "0"))
    assert "eval_loss" not in metrics
    saved = MMPhiForCausalLM.from_pretrained(str(output_dir)).config
    assert saved.image_seq_length == MMPhiConfig.tiny().image_seq_length


# --- dataset formats: one registry -----------------------------------------------------------------------------


def test_llava_pretrain_captions_train_the_projector(setup, tmp_path):
    """LLaVA-Pretrain-558K's format (one human turn with <image>, one caption) trains the projector like COCO
    captions."""
    root, data = setup
    coco = json.loads(Path(data["captions_train"]).read_text())
    files = {image["id"]: image["file_name"] for image in coco["images"]}
    records = [{"id": f"{a['image_id']:06d}-{n}", "image": files[a["image_id"]],
                "conversations": [{"from": "human", "value": "Summarize the photo.\n<image>"},
                                  {"from": "gpt", "value": a["caption"]}]}
               for n, a in enumerate(coco["annotations"])]
    path = tmp_path / "blip_laion_cc_sbu_558k.json"
    path.write_text(json.dumps(records))
    argv = projector_argv(root, data, tmp_path / "out")
    argv[argv.index("--data_path") + 1] = str(path)
    metrics = main(argv)
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 2


def test_a_new_dataset_format_is_one_registered_reader(setup, tmp_path):
    """A format nobody wrote a stage for (VQA pairs: `[{"image", "question", "answer"}]`) is one reader registered
    in mmphi.data.formats; recognised from the data, it trains the projector unchanged, and bad records name
    themselves."""
    import mmphi.data as md

    @md.register_format("vqa_pairs", matches=lambda columns: {"question", "answer"} <= columns,
                        description='[{"image", "question", "answer"}]')
    def read_vqa_pairs(records, path, options):
        samples = []
        for index, record in enumerate(records):
            if not str(record.get("answer", "")).strip():
                options.bad(f"{path}: record {index}", md.BadRecordError("empty answer"))
                continue
            image = f"{options.image_folder}/{record['image']}"
            samples.append(md.Conversation(str(index), image, [md.Turn(record["question"], record["answer"])],
                                           location=f"{path}: record {index}"))
        return samples

    try:
        root, data = setup
        coco = json.loads(Path(data["captions_train"]).read_text())
        pairs = [{"image": image["file_name"], "question": "What is shown?", "answer": "shapes"}
                 for image in coco["images"]]
        path = tmp_path / "vqa_pairs.json"
        path.write_text(json.dumps(pairs + [{"image": pairs[0]["image"], "question": "Q?", "answer": ""}]))
        with pytest.raises(md.BadRecordError, match=rf"{path.name}: record {len(pairs)}: empty answer"):
            md.read_source(str(path), data["images"])
        assert len(md.read_source(str(path), data["images"], skip_bad_records=True)) == len(pairs)

        argv = projector_argv(root, data, tmp_path / "out", "--skip_bad_records")
        argv[argv.index("--data_path") + 1] = str(path)
        metrics = main(argv)
        assert math.isfinite(metrics["train_loss"])
        assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 2
        assert metrics["skipped_bad_records"] == 1
    finally:
        md.FORMATS.pop("vqa_pairs", None)


def test_unknown_format_is_a_clear_error_naming_what_was_found(setup, tmp_path):
    root, data = setup
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"img": "a.png", "text": "x"}]))
    argv = projector_argv(root, data, tmp_path / "out")
    argv[argv.index("--data_path") + 1] = str(path)
    with pytest.raises(ValueError, match=r"rows\.json: no known dataset format fits \(columns \['img', 'text'\]\)"
                                         r".*coco_captions.*llava.*trl_messages"):
        main(argv)


def test_only_the_main_process_logs_info(setup, tmp_path):
    import logging

    from mmphi.training import configure_logging

    root, data = setup
    _, _, training_args = parse_args(projector_argv(root, data, tmp_path / "out"))
    configure_logging(training_args)  # a single process is the main one
    assert logging.getLogger().level == logging.INFO
    replica = type("Replica", (), {"should_log": False, "log_level": "passive", "log_level_replica": "warning"})()
    try:
        configure_logging(replica)
        assert logging.getLogger().level == logging.WARNING
    finally:
        configure_logging(training_args)


def test_counts_made_in_dataloader_workers_reach_the_run_report(setup, tmp_path):
    """With DataLoader workers (every real recipe uses 4) the collator runs in the workers: its skipped samples and
    padding counts come back with the batches, so the run reports what a run without workers reports."""
    root, data = setup
    images = tmp_path / "images"
    shutil.copytree(data["images"], images)
    broken = images / json.loads(Path(data["captions_train"]).read_text())["images"][0]["file_name"]
    broken.write_bytes(broken.read_bytes()[:200])
    results = {}
    for workers in ("0", "2"):
        argv = projector_argv(root, data, tmp_path / f"out{workers}", "--max_steps", "-1", "--num_train_epochs", "1",
                              "--val_fraction", "0", "--skip_bad_records", "--dataloader_num_workers", workers)
        argv[argv.index("--image_folder") + 1] = str(images)
        results[workers] = main(argv)
    assert results["2"]["skipped_bad_records"] == results["0"]["skipped_bad_records"] >= 1
    assert results["2"]["padding_fraction"] == results["0"]["padding_fraction"] > 0


def test_validate_data_and_training_refuse_control_tokens_in_answers_alike(setup, tmp_path, capsys):
    """A caption holding <image> or <|endoftext|>: --validate_data names it, training stops on it naming the same
    record, and --skip_bad_records trains without it."""
    root, data = setup
    captions = json.loads(Path(data["captions_train"]).read_text())
    captions["annotations"][2]["caption"] = "an <image> of two squares"
    bad = tmp_path / "captions.json"
    bad.write_text(json.dumps(captions))
    argv = projector_argv(root, data, tmp_path / "out", "--max_steps", "1")
    argv[argv.index("--data_path") + 1] = str(bad)
    with pytest.raises(SystemExit) as scanned:
        main([*argv, "--validate_data"])
    out = capsys.readouterr().out
    assert scanned.value.code == 1 and "annotations[2]" in out and "the caption holds <image>" in out
    with pytest.raises(BadRecordError, match=r"annotations\[2\].*the caption holds <image>"):
        main(argv)
    assert "eval_loss" in main([*argv, "--skip_bad_records"])
