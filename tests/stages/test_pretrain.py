"""The pretrain stage (scripts/pretrain.py): presets, a real tiny training run through HF Trainer, resume, bad input,
streaming, loss plot. Tiny configs on CPU, a few seconds per run."""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PhiForCausalLM

from configuration_mmphi import TINY_TEXT_CONFIG
from mmphi import TINY_TOKENIZER
from mmphi.errors import BadRecordError
from mmphi.plots import plot_trainer_state
from mmphi.stages.pretrain import align_config_with_tokenizer, build_config, count_parameters, main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = TINY_TOKENIZER
# Smaller than the `tiny` preset so a run takes seconds; dropout on, so resume must restore the RNG too.
TEST_OVERRIDES = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4,resid_pdrop=0.1"
WORDS = ("the", "ship", "sailed", "north", "across", "cold", "water", "while", "captain", "watched", "sky", "and",
         "crew", "sang", "of", "home", "congress", "shall", "make", "laws", "for", "people", "nation", "in", "peace")


def write_corpus(path, n_docs: int = 80, seed: int = 0, bad_line: bytes | None = None) -> str:
    rng = random.Random(seed)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + ".",
                         "meta": {"redpajama_set_name": "RedPajamaCommonCrawl"}}).encode() for _ in range(n_docs)]
    if bad_line is not None:
        lines.insert(5, bad_line)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def run_args(corpus: str, output_dir, cache_dir, *extra: str) -> list[str]:
    return ["--config_name", "tiny", "--config_overrides", TEST_OVERRIDES, "--tokenizer_name", TOKENIZER,
            "--train_files", corpus, "--output_dir", str(output_dir), "--data_cache_dir", str(cache_dir),
            "--block_size", "32", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
            "--gradient_accumulation_steps", "1", "--learning_rate", "3e-3", "--warmup_steps", "1",
            "--logging_steps", "1", "--eval_steps", "3", "--save_steps", "3", "--seed", "7",
            "--validation_split_percentage", "10", "--disable_tqdm", "true", *extra]


def train_losses(output_dir) -> dict[int, float]:
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    return {"root": root, "corpus": write_corpus(root / "cc.jsonl"), "cache": root / "cache"}


@pytest.fixture(scope="module")
def full_run(workdir, unexpected_warnings):
    """One uninterrupted 6-step run (checkpoints at 3 and 6), shared by the tests below."""
    output_dir = workdir["root"] / "full"
    with warnings.catch_warnings(record=True) as caught:
        metrics = main(run_args(workdir["corpus"], output_dir, workdir["cache"], "--max_steps", "6"))
    return output_dir, metrics, unexpected_warnings(caught)


# ------------------------------------------------------------------------------------------------------ presets

def test_phi2_preset_is_the_real_architecture_with_2_78b_parameters():
    config = build_config("phi-2")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (2560, 32, 32)
    assert (config.intermediate_size, config.vocab_size, config.max_position_embeddings) == (10240, 51200, 2048)
    assert config.rope_parameters["partial_rotary_factor"] == 0.4  # transformers 5 keeps it with the rope settings
    n_params = count_parameters(config)  # built on the meta device: nothing allocated
    assert round(n_params / 1e9, 2) == 2.78


def test_tiny_preset_and_overrides(tmp_path):
    tiny = build_config("tiny")
    assert {k: getattr(tiny, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")} == {
        k: TINY_TEXT_CONFIG[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
    smaller = build_config("tiny", "hidden_size=32,num_hidden_layers=2")
    assert (smaller.hidden_size, smaller.num_hidden_layers) == (32, 2)
    smaller.save_pretrained(tmp_path)  # any config path works too
    assert build_config(str(tmp_path)).hidden_size == 32


def test_config_and_tokenizer_mismatches_are_explained():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    with pytest.raises(ValueError, match="tokenizer has 4000 tokens but the config's vocab_size is 1000"):
        align_config_with_tokenizer(build_config("tiny", "vocab_size=1000"), tokenizer, block_size=64)
    with pytest.raises(ValueError, match="--block_size 4096 exceeds max_position_embeddings 2048"):
        align_config_with_tokenizer(build_config("tiny"), tokenizer, block_size=4096)


# ----------------------------------------------------------------------------------------------- a real run

def test_run_trains_evaluates_and_saves_a_loadable_model(full_run):
    output_dir, metrics, _ = full_run
    losses = train_losses(output_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]  # it learns
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["eval_loss"] < math.log(4000)  # better than uniform over the vocabulary
    assert metrics["num_input_tokens_seen"] == 6 * 4 * 32  # steps x batch x block: every block is full

    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    evals = [e for e in history if "eval_loss" in e]
    assert all(e["train_tokens_per_second"] > 0 for e in history if "loss" in e)
    # the Trainer evaluated at the last step: the final metrics are those, not a second evaluation of the same weights
    assert [e["step"] for e in evals] == [3, 6] and all("eval_perplexity" in e for e in evals)
    assert metrics["eval_loss"] == evals[-1]["eval_loss"]

    assert os.path.isfile(os.path.join(output_dir, "model.safetensors"))
    assert not any(name.endswith(".bin") and "model" in name for name in os.listdir(output_dir))
    model = AutoModelForCausalLM.from_pretrained(output_dir)  # plain transformers, no remote code
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert isinstance(model, PhiForCausalLM) and model.config.hidden_size == 32
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("the ship sailed", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)

    png = metrics["loss_curve"]
    assert png == os.path.join(str(output_dir), "loss_curve.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_default_cpu_run_warns_of_nothing_the_user_could_change(full_run):
    """The stage defaults (paged 8-bit AdamW, gradient checkpointing, pinned memory) on a CPU."""
    *_, unexpected = full_run
    assert unexpected == []


def test_trained_model_is_the_language_model_of_from_components(full_run):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from configuration_mmphi import TINY_VISION_CONFIG
    from modeling_mmphi import MMPhiForCausalLM

    output_dir, *_ = full_run
    text = AutoModelForCausalLM.from_pretrained(output_dir)
    mm = MMPhiForCausalLM.from_components(CLIPVisionModel(CLIPVisionConfig(**TINY_VISION_CONFIG)), str(output_dir))
    assert torch.equal(mm.lm_head.weight, text.lm_head.weight)
    assert torch.equal(mm.model.language_model.embed_tokens.weight, text.model.embed_tokens.weight)


def test_resume_reproduces_the_uninterrupted_losses(full_run, workdir):
    output_dir, *_ = full_run
    resumed_dir = workdir["root"] / "resumed"
    # checkpoint-3 is exactly what a run interrupted after step 3 leaves on disk
    main(run_args(workdir["corpus"], resumed_dir, workdir["cache"], "--max_steps", "6",
                  "--resume_from_checkpoint", os.path.join(str(output_dir), "checkpoint-3")))
    uninterrupted, resumed = train_losses(output_dir), train_losses(resumed_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's history
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5), step


def test_resume_latest_needs_a_checkpoint(workdir):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in"):
        main(run_args(workdir["corpus"], workdir["root"] / "empty", workdir["cache"], "--max_steps", "1",
                      "--resume_from_checkpoint", "latest"))


def test_resume_latest_skips_a_checkpoint_whose_save_was_cut_short(tmp_path, caplog):
    """A save cut short (a full disk, a kill) leaves a checkpoint without trainer_state.json, which the Trainer
    writes last: `latest` takes the newest complete one and names the one it skips."""
    from types import SimpleNamespace

    from mmphi.training import resolve_resume

    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    args = SimpleNamespace(resume_from_checkpoint="latest", output_dir=str(tmp_path))
    with caplog.at_level("WARNING", logger="mmphi.training"):
        assert resolve_resume(args) == str(tmp_path / "checkpoint-2")
    assert f"{tmp_path / 'checkpoint-10'} is incomplete" in caplog.text


# ------------------------------------------------------------------------------------------------- bad input

def test_bad_record_fails_with_location_or_is_skipped_and_counted(workdir):
    corpus = write_corpus(workdir["root"] / "bad.jsonl", bad_line=b'{"text": "cut off')
    args = run_args(corpus, workdir["root"] / "bad", workdir["cache"], "--max_steps", "1",
                    "--validation_split_percentage", "0")
    with pytest.raises(BadRecordError, match=r"bad\.jsonl:6: malformed JSON"):
        main(args)
    metrics = main([*args, "--skip_bad_records"])
    assert metrics["skipped_bad_records"] == 1


def test_streaming_run(workdir):
    with pytest.raises(ValueError, match="--streaming needs --max_steps"):
        main(run_args(workdir["corpus"], workdir["root"] / "stream0", workdir["cache"], "--streaming"))
    metrics = main(run_args(workdir["corpus"], workdir["root"] / "stream", workdir["cache"], "--streaming",
                            "--max_steps", "2", "--eval_steps", "2", "--max_eval_blocks", "4"))
    assert math.isfinite(metrics["eval_loss"]) and metrics["train_loss"] > 0


# ------------------------------------------------------------------------------------------- --dataset_name

def dataset_args(name, output_dir, cache_dir, *extra):
    args = run_args("unused", output_dir, cache_dir, *extra)
    at = args.index("--train_files")
    return args[:at] + ["--dataset_name", str(name)] + args[at + 2:]


def test_a_dataset_folder_trains_exactly_like_the_same_files(workdir):
    """run_clm.py's --dataset_name: a local dataset folder (what a hub download looks like) read by load_dataset
    gives the same documents, split, blocks and so the same losses as --train_files."""
    folder = workdir["root"] / "redpajama"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(Path(workdir["corpus"]).read_bytes())
    files = main(run_args(workdir["corpus"], workdir["root"] / "files", workdir["cache"], "--max_steps", "3"))
    dataset = main(dataset_args(folder, workdir["root"] / "dataset", workdir["cache"], "--max_steps", "3"))
    assert train_losses(workdir["root"] / "dataset") == train_losses(workdir["root"] / "files")
    assert dataset["eval_loss"] == pytest.approx(files["eval_loss"])


def test_dataset_splits_text_column_streaming_and_bad_rows(workdir):
    """A parquet dataset with its own validation split and another text column; an empty text is named, or skipped
    and counted; streaming reads the same folder."""
    import datasets

    folder = workdir["root"] / "parquet"
    (folder / "data").mkdir(parents=True)
    rows = [json.loads(line) for line in Path(workdir["corpus"]).read_text().splitlines()]
    for split, part in (("train", rows[:70]), ("validation", rows[70:])):
        records = [{"content": r["text"], "meta": json.dumps(r["meta"])} for r in part]
        if split == "train":
            records.insert(3, {"content": "  ", "meta": "{}"})
        datasets.Dataset.from_list(records).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    args = dataset_args(folder, workdir["root"] / "pq", workdir["cache"], "--max_steps", "2", "--validation_split",
                        "validation", "--text_column_name", "content")
    with pytest.raises(BadRecordError, match=r"parquet:train: record 3: 'content' is empty"):
        main(args)
    metrics = main([*args, "--skip_bad_records"])
    assert metrics["skipped_bad_records"] == 1 and math.isfinite(metrics["eval_loss"])
    with pytest.raises(ValueError, match=r"no 'text' column \(columns: \['content', 'meta'\]\)"):
        main(dataset_args(folder, workdir["root"] / "pq2", workdir["cache"], "--max_steps", "1"))
    streamed = main([*args, "--skip_bad_records", "--streaming", "--max_eval_blocks", "4", "--output_dir",
                     str(workdir["root"] / "pq-stream")])
    assert math.isfinite(streamed["eval_loss"]) and streamed["train_loss"] > 0
    with pytest.raises(ValueError, match="exactly one of --train_files"):
        main(run_args(workdir["corpus"], workdir["root"] / "both", workdir["cache"], "--dataset_name", str(folder)))


# ------------------------------------------------------------------------------------------------------- plots

def test_plot_logs_draws_any_stage_and_rejects_an_empty_history(tmp_path):
    history = [{"step": s, "loss": 5.0 / s} for s in range(1, 6)] + [{"step": 5, "eval_loss": 1.3}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    png = plot_trainer_state(str(tmp_path))
    assert os.path.getsize(png) > 1000
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "learning_rate": 1.0}]}))
    with pytest.raises(ValueError, match="no loss entries"):
        plot_trainer_state(str(tmp_path))


# --------------------------------------------------------------------------------------------------- benchmark

def test_demo_recipe_parses_into_cpu_friendly_arguments():
    from mmphi.recipes import recipe_args
    from mmphi.stages.pretrain import parse_args

    model_args, data_args, training_args = parse_args(
        [*recipe_args("tiny", "pretrain"), "--train_files", "c.jsonl", "--max_steps", "10"])
    assert model_args.config_name == "tiny" and data_args.block_size == 128
    assert training_args.max_steps == 10 and not training_args.gradient_checkpointing
    assert not (training_args.fp16 or training_args.bf16)  # no CUDA here: fp32 instead of failing


def test_unigram_baseline_is_the_smoothed_frequency_model():
    from benchmarks.pretrain import unigram_perplexity

    train = [[1, 1, 1, 2], [1, 2, 3, 1]]
    held_out = [[0, 1, 2, 3]]  # the first token of a block is never a target
    counts = {t: train[0].count(t) + train[1].count(t) + 1 for t in range(5)}  # add-one over a 5-token vocabulary
    total = sum(counts.values())
    expected = math.exp(-sum(math.log(counts[t] / total) for t in (1, 2, 3)) / 3)
    assert unigram_perplexity(train, held_out, vocab_size=5) == pytest.approx(expected)


def test_memory_plan_estimate_and_measurement_path():
    from benchmarks.pretrain import estimate_memory, measure_memory

    config = build_config("phi-2")
    plan = estimate_memory(config, micro_batch=4, block_size=2048, n_params=count_parameters(config))
    assert plan.weights_fp32 == plan.gradients_fp32 == 4 * plan.parameters
    parts = (plan.weights_fp32, plan.gradients_fp32, plan.adam_8bit_states, plan.checkpointed_layer_inputs,
             plan.one_layer_recompute, plan.logits_and_loss)
    assert plan.total == pytest.approx(sum(parts))
    # the measuring path itself runs (on CPU here, where it reports no CUDA peak)
    result = measure_memory(build_config("tiny", TEST_OVERRIDES), micro_batch=2, block_size=16, steps=2,
                            peak_tflops=None)
    assert result["tokens_per_second"] > 0 and math.isfinite(result["loss"])
