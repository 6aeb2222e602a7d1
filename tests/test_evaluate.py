"""mmphi/metrics.py on hand-checkable inputs, and scripts/evaluate_mmphi.py end to end on the tiny model (CPU)."""

import json
import math
from pathlib import Path

import pytest
import torch

from mmphi.build import build_tiny, save_mmphi
from mmphi.data import BadRecordError
from mmphi.data.synthetic import generate
from mmphi.evaluation import infer_question_type, main, perplexity_windows
from mmphi.metrics import (
    CiderD,
    corpus_bleu4,
    corpus_cider,
    normalize_vqa_answer,
    vqa_accuracy,
    vqa_exact_match,
    vqa_soft_accuracy,
)

# --- VQA normalization -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, normalized", [
    ("Red", "red"),
    ("  The red one.\n", "red 1"),  # VQA maps number words even here
    ("Two", "2"),
    ("a 3", "3"),
    ("three circles!", "3 circles"),
    ("yes, it is", "yes it is"),
    ("top-left", "top left"),
    ("3.5", "3.5"),
    ("1,000", "1000"),
    ("dont know", "don't know"),
    ("An Apple", "apple"),
    ("2.", "2"),  # vqaEval.py's period regex keeps a period only when a digit follows it
    ("It is 2. Yes", "it is 2 yes"),
    (".5", ".5"),
])
def test_vqa_normalization(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_exact_match_after_normalization():
    assert vqa_exact_match("Red.", "red")
    assert vqa_exact_match("the square", "square")
    assert vqa_exact_match("three", "3")
    assert vqa_exact_match("bottom right", ["top left", "Bottom-right"])
    assert not vqa_exact_match("red square", "red")
    assert not vqa_exact_match("4", "3")


@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_is_the_official_leave_one_out_average(matching, expected):
    """vqaEval.py: for each of the 10 human answers left out, min(#others equal to the prediction / 3, 1); averaged.
    So 1 matching human answer scores 0.3, 2 score 0.6, 3 score 0.9 and 4 or more 1.0."""
    answers = ["Two."] * matching + ["three"] * (10 - matching)
    assert vqa_soft_accuracy("2", answers) == pytest.approx(expected)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)
    assert vqa_accuracy("2", ["two"]) == 1.0 and vqa_accuracy("2", ["3"]) == 0.0  # one reference: exact match


def test_question_type_inference():
    assert infer_question_type("<image>\nWhat colour is the circle?", "red") == "colour"
    assert infer_question_type("What color are they?", "blue") == "colour"
    assert infer_question_type("How many shapes are there?", "3") == "count"
    assert infer_question_type("Are there any red shapes?", "no") == "yes/no"
    assert infer_question_type("Where is the square?", "top left") == "position"
    assert infer_question_type("What is this?", "a dog") == "other"


# --- BLEU-4 and CIDEr-D ------------------------------------------------------------------------------------------


def test_bleu4_by_hand():
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat": matches 5/6 unigrams, 3/5 bigrams, 2/4 trigrams,
    # 1/3 four-grams; same length, so no brevity penalty: BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4)
    result = corpus_bleu4(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert result["bleu4"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)
    assert result["bleu_precisions"] == pytest.approx([5 / 6, 3 / 5, 2 / 4, 1 / 3])
    assert corpus_bleu4(["A red square."], [["a red square ."]])["bleu4"] == pytest.approx(1.0)


def test_bleu4_uses_all_references_and_any_number_of_them():
    one_ref = corpus_bleu4(["the cat sat on the mat"], [["the cat sat on a mat"]])["bleu4"]
    two_refs = corpus_bleu4(["the cat sat on the mat"], [["the cat sat on a mat", "on the mat the cat sat"]])["bleu4"]
    assert two_refs > one_ref  # "on the mat" is only in the second reference
    mixed = corpus_bleu4(["a dog", "the cat sat on the mat"], [["a dog"], ["the cat sat on a mat", "x y z"]])
    assert 0 < mixed["bleu4"] <= 1


def test_cider_by_hand():
    # Two images, one reference each. ref_len = log 2 = L; "a" is in both references (idf 0), every other n-gram in
    # one (idf L). Image B's hypothesis equals its reference: cosine 1 for n = 1..3, 0 for n = 4 (no 4-gram), so
    # 10 * 3/4 = 7.5. Image A "a red circle" vs "a red square": n=1 {red: L, circle: L} . {red: L, square: L}
    # / (sqrt 2 L)^2 = 1/2; n=2 likewise 1/2; n=3 and 4: 0 -> 10 * 1/4 = 2.5. Corpus: the mean, 5.0.
    score, per_image = CiderD().compute(["a red circle", "a blue circle"], [["a red square"], ["a blue circle"]])
    assert per_image == pytest.approx([2.5, 7.5])
    assert score == pytest.approx(5.0)


def test_cider_length_penalty_by_hand():
    # "red square" vs "a red square": n=1 cosine 1 ("a" has idf 0); n=2 {red square: L} . {a red: L, red square: L}
    # = L^2 / (L * sqrt 2 L) = 1/sqrt 2; n=3, 4: 0. Lengths (in bigrams) 1 vs 2: penalty exp(-1 / (2 * 6^2)).
    _, per_image = CiderD().compute(["red square", "a blue circle"], [["a red square"], ["a blue circle"]])
    assert per_image[0] == pytest.approx(10 * (1 + 2 ** -0.5) / 4 * math.exp(-1 / 72))


def test_cider_clips_repeated_ngrams_and_ignores_case_and_punctuation():
    refs = [["a red square"], ["a blue circle"]]
    assert corpus_cider(["A red square.", "a BLUE circle!"], refs) == pytest.approx(7.5)
    _, repeated = CiderD().compute(["red red red red", "a blue circle"], refs)
    _, single = CiderD().compute(["red", "a blue circle"], refs)
    assert repeated[0] < single[0] + 1e-9  # repeating a matching word earns nothing more
    assert corpus_cider(["a red square"], [["a red square"]]) == 0.0  # one image: every idf is log(1/1) = 0


def test_caption_metrics_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        corpus_cider(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty list"):
        corpus_bleu4(["a"], [[]])


# --- perplexity windows ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, max_length, stride", [(10, 4, 3), (10, 4, 1), (3, 8, 7), (17, 5, 4), (2, 2, 1)])
def test_perplexity_windows_score_every_token_once(n, max_length, stride):
    tokens = list(range(n))
    scored = []
    for window, new in perplexity_windows(tokens, max_length, stride):
        assert len(window) <= max_length and 0 < new < len(window) + 1
        assert new <= len(window) - 1  # the window's first token is context only
        scored += window[len(window) - new:]
    assert scored == tokens[1:]


# --- evaluate.py end to end --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    model, processor = build_tiny(seed=0)
    folder = tmp_path_factory.mktemp("tiny") / "mmphi"
    save_mmphi(model, processor, str(folder))
    return folder


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return generate(str(root), num_images=10, val_fraction=0.3, text_only_fraction=0.5, seed=3)


def test_vqa_end_to_end(tiny_folder, synthetic, tmp_path):
    output, predictions_file = tmp_path / "vqa.json", tmp_path / "predictions.jsonl"
    result = main(["--task", "vqa", "--model_name_or_path", str(tiny_folder), "--data_path", synthetic["llava_val"],
                   "--image_folder", synthetic["images"], "--output_file", str(output), "--predictions_file",
                   str(predictions_file), "--batch_size", "4", "--max_new_tokens", "4"])
    assert json.loads(output.read_text()) == result
    records = json.loads(Path(synthetic["llava_val"]).read_text())
    human_turns = [t for r in records for t in r["conversations"] if t["from"] == "human"]
    assert result["questions"] == len(human_turns)
    expected_types = {t["question_type"] for t in human_turns}
    assert set(result["per_type"]) == expected_types
    for name in expected_types:
        assert result["per_type"][name]["questions"] == sum(t["question_type"] == name for t in human_turns)
    predictions = [json.loads(line) for line in predictions_file.read_text().splitlines()]
    assert len(predictions) == len(human_turns)
    for p in predictions:
        assert p["correct"] == (normalize_vqa_answer(p["prediction"]) == normalize_vqa_answer(p["answer"]))
    assert result["accuracy"] == pytest.approx(sum(p["correct"] for p in predictions) / len(predictions))


def test_caption_end_to_end(tiny_folder, synthetic, tmp_path):
    result = main(["--task", "caption", "--model_name_or_path", str(tiny_folder), "--data_path",
                   synthetic["captions_val"], "--image_folder", synthetic["images"], "--max_new_tokens", "6",
                   "--output_file", str(tmp_path / "caption.json")])
    n_images = len(json.loads(Path(synthetic["captions_val"]).read_text())["images"])
    assert result["images"] == n_images
    assert 0 <= result["bleu4"] <= 1 and 0 <= result["cider"] <= 10
    assert json.loads((tmp_path / "caption.json").read_text())["cider"] == result["cider"]


def test_perplexity_matches_the_models_own_loss(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea."
    (tmp_path / "doc.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "doc.txt").write_text(text)
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    ids = [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, trust_remote_code=True).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    for name in ("doc.jsonl", "doc.txt"):
        result = main(["--task", "perplexity", "--model_name_or_path", str(tiny_folder), "--data_path",
                       str(tmp_path / name), "--max_length", "256"])
        assert result["tokens"] == len(ids) - 1
        assert result["loss"] == pytest.approx(expected, rel=1e-4)
        assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    strided = main(["--task", "perplexity", "--model_name_or_path", str(tiny_folder), "--data_path",
                    str(tmp_path / "doc.txt"), "--max_length", "8", "--stride", "3", "--batch_size", "5"])
    assert strided["tokens"] == len(ids) - 1  # every token still scored exactly once, with less context


def test_bad_image_is_named_or_skipped(tiny_folder, synthetic, tmp_path):
    records = json.loads(Path(synthetic["llava_val"]).read_text())
    with_image = next(r for r in records if "image" in r)
    broken = tmp_path / "broken.png"
    broken.write_bytes((Path(synthetic["images"]) / with_image["image"]).read_bytes()[:200])  # truncated PNG
    bad = dict(with_image, id="bad-one", image=str(broken))
    data = tmp_path / "val.json"
    data.write_text(json.dumps(records + [bad]))
    argv = ["--task", "vqa", "--model_name_or_path", str(tiny_folder), "--data_path", str(data), "--image_folder",
            synthetic["images"], "--max_new_tokens", "2"]
    with pytest.raises(BadRecordError, match=r"record \d+ \(id=bad-one\).*broken\.png"):
        main(argv)
    result = main(argv + ["--skip_bad_records"])
    assert result["skipped_bad_records"] == 1
    assert result["questions"] == sum(t["from"] == "human" for r in records for t in r["conversations"])
