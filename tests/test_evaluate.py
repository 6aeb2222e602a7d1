"""mmphi/metrics.py on hand-checkable inputs, and scripts/evaluate_mmphi.py end to end on the tiny model (CPU)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mmphi.data import BadRecordError
from mmphi.data.synthetic import generate
from mmphi.evaluation import infer_question_type, main, perplexity_windows
from mmphi.metrics import (
    coco_caption_scores,
    normalize_vqa_answer,
    pope_answer,
    pope_scores,
    tokenize_captions,
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


# --- BLEU-4 and CIDEr-D (pycocoevalcap's scorers) -----------------------------------------------------------------

TOKENIZERS = ["ptb-python", pytest.param("ptb-java", marks=pytest.mark.skipif(
    shutil.which("java") is None, reason="no Java: `make install` installs default-jre-headless"))]


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_bleu4_by_hand(tokenizer):
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat": matches 5/6 unigrams, 3/5 bigrams, 2/4 trigrams,
    # 1/3 four-grams; same length, so no brevity penalty: BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4)
    result = coco_caption_scores(["The cat sat on the mat."], [["the cat sat on a mat"]], tokenizer)
    assert result["bleu4"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)
    assert result["bleu"][:3] == pytest.approx([5 / 6, (5 / 6 * 3 / 5) ** 0.5, (5 / 6 * 3 / 5 * 2 / 4) ** (1 / 3)])
    assert result["tokenizer"] == tokenizer
    two_refs = coco_caption_scores(["the cat sat on the mat"],
                                   [["the cat sat on a mat", "on the mat the cat sat"]], tokenizer)["bleu4"]
    assert two_refs > result["bleu4"]  # "on the mat" is only in the second reference


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_cider_d_by_hand(tokenizer):
    # Two images, one reference each. ref_len = log 2 = L; "a" is in both references (idf 0), every other n-gram in
    # one (idf L). Image B's hypothesis equals its reference: cosine 1 for n = 1..3, 0 for n = 4 (no 4-gram), so
    # 10 * 3/4 = 7.5. Image A "a red circle" vs "a red square": n=1 {red: L, circle: L} . {red: L, square: L}
    # / (sqrt 2 L)^2 = 1/2; n=2 likewise 1/2; n=3 and 4: 0 -> 10 * 1/4 = 2.5. Corpus: the mean, 5.0.
    result = coco_caption_scores(["a red circle", "A blue circle!"], [["a red square"], ["a blue circle"]], tokenizer)
    assert result["cider_per_item"] == pytest.approx([2.5, 7.5])
    assert result["cider"] == pytest.approx(5.0)
    # length penalty: "red square" vs "a red square": n=1 cosine 1 ("a" has idf 0); n=2 {red square: L} . {a red: L,
    # red square: L} = 1/sqrt 2; n=3, 4: 0. Lengths (in bigrams) 1 vs 2: penalty exp(-1 / (2 * 6^2)).
    result = coco_caption_scores(["red square", "a blue circle"], [["a red square"], ["a blue circle"]], tokenizer)
    assert result["cider_per_item"][0] == pytest.approx(10 * (1 + 2 ** -0.5) / 4 * math.exp(-1 / 72))
    # clipping: repeating a matching word earns nothing more
    repeated = coco_caption_scores(["red red red red", "a blue circle"], [["a red square"], ["a blue circle"]],
                                   tokenizer)["cider_per_item"][0]
    single = coco_caption_scores(["red", "a blue circle"], [["a red square"], ["a blue circle"]],
                                 tokenizer)["cider_per_item"][0]
    assert repeated < single + 1e-9


CAPTIONS = [
    "A man's dog doesn't like the cat.", "Two red squares, one blue circle; and a triangle!", "A T-shirt (red).",
    "The 3.5-inch disk isn't here...", "It's a dog-eat-dog world -- really?", "He said: \"hello\" & left.",
    "a red square at the top-left of the image", "Three shapes: a small green circle, a large blue square.",
    "Pizza's on the table, isn't it?", "A cat on a mat.\nAnother line", "U.S. flags at 5 p.m. on the I-95",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="no Java: `make install` installs default-jre-headless")
def test_the_python_tokenizer_follows_the_java_ptb_tokenizer():
    """The fallback used without Java tokenises like pycocoevalcap's PTBTokenizer on these captions (contractions,
    possessives, hyphens, decimals, punctuation, quotes, abbreviations)."""
    java, _ = tokenize_captions({i: [c] for i, c in enumerate(CAPTIONS)}, "ptb-java")
    python, _ = tokenize_captions({i: [c] for i, c in enumerate(CAPTIONS)}, "ptb-python")
    assert python == java


def test_caption_metrics_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        coco_caption_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty list"):
        coco_caption_scores(["a"], [[]])


# --- POPE --------------------------------------------------------------------------------------------------------


def test_pope_parses_answers_as_the_official_script():
    assert pope_answer("Yes, there is a dog in the image.") == "yes"
    assert pope_answer("No, there is no dog.") == "no"
    assert pope_answer("There is not a dog") == "no"
    assert pope_answer("Yes. No other objects.") == "yes"  # only the first sentence counts
    assert pope_answer("Nope") == "yes"  # the official rule looks for the words No / no / not only


def test_pope_scores_by_hand():
    # labels yes yes yes no no; answers yes no yes yes no -> TP 2, FN 1, FP 1, TN 1
    scores = pope_scores(["Yes", "No.", "yes, it is", "Yes", "no"], ["yes", "yes", "yes", "no", "no"])
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3) and scores["yes_ratio"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="'yes' or 'no', got 'maybe'"):
        pope_scores(["yes"], ["maybe"])


# --- the evaluate modules ----------------------------------------------------------------------------------------


def test_metrics_load_offline_as_evaluate_modules():
    import evaluate

    root = Path(__file__).resolve().parent.parent / "metrics"
    vqa = evaluate.load(str(root / "vqa_accuracy"))
    result = vqa.compute(predictions=["Two.", "red"], references=[["2"], ["blue"] * 9 + ["red"]])
    assert result["accuracy"] == pytest.approx((1.0 + 0.3) / 2)
    captions = evaluate.load(str(root / "coco_caption"))
    result = captions.compute(predictions=["a red circle", "a blue circle"],
                              references=[["a red square"], ["a blue circle"]], tokenizer="ptb-python")
    assert result["cider"] == pytest.approx(5.0) and result["tokenizer"] == "ptb-python"
    pope = evaluate.load(str(root / "pope"))
    assert pope.compute(predictions=["Yes", "No"], references=["yes", "yes"])["recall"] == pytest.approx(0.5)


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
    assert result["scoring"].startswith("exact match against the record's one answer")


def test_vqav2_files_are_scored_with_the_official_soft_accuracy(tiny_folder, synthetic, tmp_path):
    """VQAv2's questions + annotations files (10 human answers, COCO_<subtype>_<id>.jpg images): each question's
    score is vqaEval's leave-one-out average, here set by hand by putting the model's own answer among the human
    answers 0-4 times; a question without an annotation is named, or skipped and counted."""
    import shutil

    records = json.loads(Path(synthetic["llava_val"]).read_text())
    folder = tmp_path / "val2014"
    folder.mkdir()
    questions = []
    for n, record in enumerate(r for r in records if r.get("image")):
        shutil.copy(Path(synthetic["images"]) / record["image"], folder / f"COCO_val2014_{n:012d}.jpg")
        questions.append({"image_id": n, "question": record["conversations"][0]["value"].replace("<image>", "")
                          .strip(), "question_id": 1000 + n})
    questions_file = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions_file.write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    annotations_file = tmp_path / "v2_mscoco_val2014_annotations.json"

    def annotate(answers_by_question):
        annotations_file.write_text(json.dumps({"annotations": [
            {"question_id": q["question_id"], "image_id": q["image_id"], "answer_type": ("yes/no", "other")[k % 2],
             "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers_by_question[k])]}
            for k, q in enumerate(questions)]}))

    argv = ["--task", "vqa", "--model_name_or_path", str(tiny_folder), "--data_path", str(questions_file),
            "--annotations_file", str(annotations_file), "--image_folder", str(folder), "--max_new_tokens", "3",
            "--predictions_file", str(tmp_path / "p.jsonl")]
    annotate([["zebra"] * 10 for _ in questions])
    main(argv)
    predicted = [json.loads(line)["answer"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    matches = [k % 5 for k in range(len(questions))]  # how many humans gave the model's answer
    annotate([[predicted[k]] * m + ["zebra"] * (10 - m) for k, m in enumerate(matches)])
    result = main(argv)
    by_hand = [(m * min(1, (m - 1) / 3) + (10 - m) * min(1, m / 3)) / 10 for m in matches]
    assert result["scoring"].startswith("VQAv2 soft accuracy") and result["questions"] == len(questions)
    assert result["accuracy"] == pytest.approx(sum(by_hand) / len(by_hand))
    scored = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["question_id"] for p in scored] == [q["question_id"] for q in questions]
    assert [p["accuracy"] for p in scored] == pytest.approx(by_hand)
    assert set(result["per_type"]) == {"yes/no", "other"}

    questions.append({"image_id": 0, "question": "Is it?", "question_id": 5})
    questions_file.write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    with pytest.raises(BadRecordError, match=r"question \d+ \(question_id=5\): no annotation"):
        main(argv)
    assert main([*argv, "--skip_bad_records"])["skipped_bad_records"] == 1
    with pytest.raises(ValueError, match="is a VQAv2 questions file: pass its annotations with --annotations_file"):
        main([a for a in argv if a not in ("--annotations_file", str(annotations_file))])


def test_caption_end_to_end(tiny_folder, synthetic, tmp_path):
    result = main(["--task", "caption", "--model_name_or_path", str(tiny_folder), "--data_path",
                   synthetic["captions_val"], "--image_folder", synthetic["images"], "--max_new_tokens", "6",
                   "--output_file", str(tmp_path / "caption.json")])
    n_images = len(json.loads(Path(synthetic["captions_val"]).read_text())["images"])
    assert result["images"] == n_images
    assert 0 <= result["bleu4"] <= 1 and 0 <= result["cider"] <= 10
    assert json.loads((tmp_path / "caption.json").read_text())["cider"] == result["cider"]


def test_pope_end_to_end(tiny_folder, synthetic, tmp_path):
    """A POPE question file (JSON lines) -> yes/no answers scored as POPE does; the scores follow the predictions."""
    coco = json.loads(Path(synthetic["captions_val"]).read_text())
    lines = [{"question_id": n, "image": image["file_name"], "text": f"Is there a {shape} in the image?",
              "label": label}
             for n, (image, (shape, label)) in enumerate(
                 (image, pair) for image in coco["images"] for pair in (("circle", "yes"), ("dog", "no")))]
    path = tmp_path / "pope_random.json"
    path.write_text("\n".join(json.dumps(line) for line in lines + [{"question_id": 99, "image": "x.png",
                                                                      "text": "Is it?", "label": "maybe"}]))
    argv = ["--task", "pope", "--model_name_or_path", str(tiny_folder), "--data_path", str(path), "--image_folder",
            synthetic["images"], "--max_new_tokens", "3", "--predictions_file", str(tmp_path / "p.jsonl")]
    with pytest.raises(BadRecordError, match=r"pope_random.json: record 6 \(question_id=99\): \"label\" must be"):
        main(argv)
    result = main([*argv, "--skip_bad_records"])
    assert result["questions"] == len(lines) and result["skipped_bad_records"] == 1
    predictions = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    correct = sum(p["parsed"] == p["label"] for p in predictions)
    assert result["accuracy"] == pytest.approx(correct / len(lines))
    assert result["yes_ratio"] == pytest.approx(sum(p["parsed"] == "yes" for p in predictions) / len(lines))


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
