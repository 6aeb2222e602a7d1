"""benchmarks.benchmark and benchmarks/gpu_check.sh: the FLOP and memory accounting, the Markdown section it appends
to, a real measured run on the CPU (Trainer vs bare loop on the same model and batch), and the GPU check's CPU dry
run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import PhiConfig, PhiForCausalLM

from benchmarks.benchmark import main
from benchmarks.flops import attention_flops_per_token, linear_weights
from benchmarks.measure import sample_lengths
from benchmarks.report import append_to_markdown, estimate, goal_verdicts
from configuration_mmphi import PHI2_TEXT_CONFIG

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_estimate_counts_phi2_exactly_and_adds_up():
    from mmphi.stages.pretrain import build_config, count_parameters

    result = estimate()
    assert result["phi2_parameters"] == count_parameters(build_config("phi-2"))  # the meta-device count
    for stage in ("pretrain_gib", "instruct_gib"):
        parts = {k: v for k, v in result[stage].items() if k != "total"}
        assert result[stage]["total"] == pytest.approx(sum(parts.values()))
    # fp32 weights + fp32 grads alone are 8 bytes per parameter; QLoRA's 4-bit weights are ~1/8 of fp32 ones
    assert result["pretrain_gib"]["weights_fp32"] * 2**30 == 4 * result["phi2_parameters"]
    assert result["instruct_gib"]["weights_4bit"] < result["pretrain_gib"]["weights_fp32"] / 7
    assert result["kind"].startswith("ESTIMATE")


def test_linear_weight_count_and_attention_term():
    config = PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=100)
    model = PhiForCausalLM(config)
    expected = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear_weights(model) == expected
    model.lm_head.requires_grad_(False)
    assert linear_weights(model, trainable=False) == 32 * 100
    assert linear_weights(model, trainable=True) == expected - 32 * 100
    phi2 = PhiConfig(**PHI2_TEXT_CONFIG)
    assert attention_flops_per_token(phi2, 2048) == 12 * 32 * 2560 * 2048  # PaLM's 12 L H T


def test_tokens_are_counted_in_the_batch_that_runs():
    padded = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    assert sample_lengths(padded) == [5, 3]  # padding is not a token the model was asked to learn
    assert sample_lengths({"input_ids": torch.zeros(3, 4, dtype=torch.long)}) == [4, 4, 4]  # pretrain's full blocks


def test_markdown_runs_go_at_the_end_of_the_harness_section(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Other\n\ntheirs\n")
    append_to_markdown(str(path), "### run 1\n")
    append_to_markdown(str(path), "### run 2\n")
    text = path.read_text()
    assert text.index("## Other") < text.index("## Benchmark harness") < text.index("### run 1") < text.index(
        "### run 2")
    path.write_text("# Benchmarks\n\n## Benchmark harness\n\nintro\n\n## Later\n\nlater\n")
    append_to_markdown(str(path), "### run 3\n")
    text = path.read_text()
    assert text.index("intro") < text.index("### run 3") < text.index("## Later") and "later\n" in text


def test_cpu_run_measures_trainer_and_bare_loop_on_the_same_batch(tmp_path):
    report = main(["--device", "cpu", "--stages", "projector", "--warmup", "1", "--steps", "2",
                   "--json", str(tmp_path / "run.json"), "--markdown", str(tmp_path / "BENCH.md")])
    (result,) = report["results"]
    assert result["stage"] == "projector" and result["size"] == "tiny" and not report["errors"]
    for loop in ("trainer", "bare"):
        phase = result[loop]
        assert len(phase["step_s"]) == 2 and all(t > 0 for t in phase["step_s"])
        assert phase["tokens_per_second"] == pytest.approx(phase["samples_per_second"] * result["seq"])
        assert phase["peak_memory_gib"] > 0.1  # peak RSS of a process holding torch and the model
        assert "mfu" not in phase  # no MFU without a GPU
    assert result["overhead_ratio"] == pytest.approx(result["trainer"]["median_step_s"] /
                                                     result["bare"]["median_step_s"])
    # only the projector trains in the projector stage; both loops train the same model from the same batch
    assert 0 < result["trainable_parameters"] < result["total_parameters"] / 10
    assert all(0 < result[loop]["loss"] < 20 for loop in ("trainer", "bare"))  # both trained: finite losses
    with open(tmp_path / "run.json") as handle:
        assert json.load(handle)["results"][0]["stage"] == "projector"
    text = (tmp_path / "BENCH.md").read_text()
    assert "## Benchmark harness" in text and "| projector |" in text
    assert report["machine"] in text


@pytest.mark.slow  # the GPU harness end to end on the CPU: five fresh processes
def test_gpu_check_dry_run_on_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), STAGES="instruct", VARIANTS="baseline liger", PYTHON=sys.executable)
    result = subprocess.run(["bash", os.path.join(REPO_ROOT, "benchmarks", "gpu_check.sh"), "--tiny"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["environment.txt", "goals.json", "gpu_check.log", "gpu_check.md",
                                            "instruct.json", "pretrain-baseline.json", "pretrain-liger.json",
                                            "variants.md"]
    variants = (tmp_path / "variants.md").read_text().splitlines()
    assert variants[2].startswith("| baseline | `(defaults)` |")
    assert variants[3].startswith("| liger | `--use_liger_kernel true` |")
    liger_loss_delta = float(variants[3].split("|")[8])
    assert abs(liger_loss_delta) < 1e-4  # the fused loss changes nothing but speed
    with open(tmp_path / "instruct.json") as handle:
        report = json.load(handle)
    assert report["size"] == "tiny" and report["results"][0]["stage"] == "instruct" and not report["errors"]
    goals = goal_verdicts([str(tmp_path / "instruct.json")])
    assert "not a real-size run" in goals["note"] and "instruct" in goals
    assert "| instruct |" in (tmp_path / "gpu_check.md").read_text()
    assert "transformers" in (tmp_path / "environment.txt").read_text()


class Copier(torch.nn.Module):
    """Predicts the token that followed the last earlier occurrence of the current one (an ideal induction head)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for row, ids in enumerate(input_ids.tolist()):
            for t, token in enumerate(ids):
                earlier = [s for s in range(t) if ids[s] == token]
                if earlier:
                    logits[row, t, ids[earlier[-1] + 1]] = 1.0
        return type("Output", (), {"logits": logits})()


def test_in_context_copying_tells_a_copier_from_a_random_language_model():
    from benchmarks.question_types import in_context_copying
    from mmphi.build import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    copier = in_context_copying(Copier(len(tokenizer)), tokenizer, length=12, sequences=8)
    assert copier["second_copy_accuracy"] == 1.0 and copier["first_copy_accuracy"] < 0.05
    torch.manual_seed(0)
    random_phi = PhiForCausalLM(PhiConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4)).eval()
    scores = in_context_copying(random_phi, tokenizer, length=12, sequences=8)
    assert scores["second_copy_accuracy"] < 0.05 and scores["chance"] < 1e-3


def test_caption_positions_scores_the_first_quadrant_a_caption_names(tmp_path):
    from benchmarks.question_types import caption_positions

    rows = [
        {"prediction": "A red circle in the top left.", "references": ["A red circle in the top left."]},
        {"prediction": "A blue square in the bottom right, not the top left.",
         "references": ["A blue square in the top left."]},
        {"prediction": "A green triangle.", "references": ["A green triangle in the bottom left."]},
        {"prediction": "Three red circles in the top left.", "references": ["Three red circles."]},  # not single
    ]
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert caption_positions(str(path)) == {"single_object_images": 3, "caption_names_a_quadrant": 2,
                                            "caption_names_the_right_one": 1}


def test_position_halves_counts_each_axis_of_the_answers(tmp_path):
    from benchmarks.question_types import position_halves, read_predictions

    rows = [
        {"type": "position", "answer": "top left", "prediction": "top left"},
        {"type": "position", "answer": "bottom left", "prediction": "bottom right"},  # left/right wrong
        {"type": "position", "answer": "top right", "prediction": "bottom left"},  # both wrong
        {"type": "position", "answer": "bottom right", "prediction": "top"},  # top/bottom wrong, no side
        {"type": "colour", "answer": "red", "prediction": "top left"},  # not a position question
    ]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert position_halves(read_predictions(str(path))) == {"questions": 4, "vertical_half_right": 2,
                                                            "horizontal_half_right": 1}


@pytest.mark.slow  # trains two linear probes to convergence
def test_tower_ceiling_learns_grid_shapes_but_not_the_variants(tmp_path):
    """The tiny tower, trained on the labels, learns our grid layout's count and shape in 300 steps; on the
    variant's free-placed 64 px shapes the same budget stays far lower (BENCHMARKS.md "Tiny CLIP", tower ceiling)."""
    from benchmarks.tower_ceiling import supervised_ceiling
    from mmphi.data import synthetic, synthetic_variant

    small = dict(steps=300, batch_size=32, tower={"image_size": 64, "patch_size": 16}, eval_every=100)
    synthetic.generate(str(tmp_path / "grid"), num_images=300, seed=0)
    synthetic_variant.generate(str(tmp_path / "variant"), num_images=300, seed=0)
    grid = supervised_ceiling(str(tmp_path / "grid"), **small)
    variant = supervised_ceiling(str(tmp_path / "variant"), **small)
    assert (grid["train_images"], grid["held_out_images"]) == (270, 30)
    assert [point["step"] for point in grid["curve"]] == [100, 200, 300]
    assert grid["curve"][-1]["shape"] >= 0.95 and grid["curve"][-1]["count"] >= 0.8
    assert variant["curve"][-1]["shape"] <= grid["curve"][-1]["shape"] - 0.3


def test_tower_ceiling_needs_held_out_images(tmp_path):
    from benchmarks.tower_ceiling import supervised_ceiling
    from mmphi.data import synthetic

    paths = synthetic.generate(str(tmp_path / "grid"), num_images=20, seed=0)
    with open(paths["scenes"]) as handle:
        scenes = json.load(handle)
    with open(paths["scenes"], "w") as handle:
        json.dump([dict(scene, split="train") for scene in scenes], handle)
    with pytest.raises(ValueError, match="scenes.json has no val images"):
        supervised_ceiling(str(tmp_path / "grid"), steps=1)


def test_zero_check_passes_a_trained_folder_and_names_what_is_wrong(tiny_folder, tmp_path):
    """gpu_check.sh's ZeRO verdict (benchmarks/zero.py): a loadable folder with a moved projector passes; an
    untrained one, a save with ZeRO-3's empty placeholders and a failed launch fail with the reason."""
    from benchmarks.zero import check
    from benchmarks.zero import main as zero_main
    from mmphi.build import save_mmphi
    from mmphi.loading import load_mmphi

    model, processor = load_mmphi(str(tiny_folder))
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.bias.add_(0.5)
    save_mmphi(model, processor, str(tmp_path / "trained"))
    row = check("zero3", 0, 12.5, 1, str(tmp_path / "trained"), str(tiny_folder))
    assert row["result"] == "pass" and row["projector_moved"] == pytest.approx(0.5)
    assert row["model_class"] == "MMPhiForCausalLM" and row["saved_dtypes"] == ["float32"]
    untrained = check("zero2", 0, 10.0, 1, str(tiny_folder), str(tiny_folder))
    assert untrained["result"] == "fail" and "equals the initial one" in untrained["error"]
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.weight.data = torch.empty(0)
    save_mmphi(model, processor, str(tmp_path / "placeholders"))
    placeholders = check("zero3", 0, 1.0, 1, str(tmp_path / "placeholders"), str(tiny_folder))
    assert placeholders["result"] == "fail" and "ignore_mismatched_sizes" in placeholders["error"]
    (tmp_path / "crashed.log").write_text("[rank0]: RuntimeError: weight should have at least three dimensions\n")
    crashed = check("zero3", 1, 3.0, 1, str(tmp_path / "crashed"), str(tiny_folder))
    assert crashed["error"] == ("RuntimeError: the launch exited 1: [rank0]: RuntimeError: weight should have at "
                                "least three dimensions")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in (row, untrained)) + "\n")
    zero_main(["report", "--rows", str(rows), "--json", str(tmp_path / "zero.json"), "--markdown",
               str(tmp_path / "gpu_check.md"), "--extra=--cache_vision_features false"])
    assert [r["result"] for r in json.loads((tmp_path / "zero.json").read_text())["runs"]] == ["pass", "fail"]
    assert "| zero3 | **pass** | 12.5 |" in (tmp_path / "gpu_check.md").read_text()
