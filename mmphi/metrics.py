"""Evaluation metrics that give the numbers papers report: VQA accuracy with the official normalisation (a port of
vqaEval.py) and soft accuracy, BLEU-4 and CIDEr-D from pycocoevalcap's own scorers (the COCO caption evaluation),
and POPE (yes/no object probing, its official answer parsing). `metrics/` in the repo wraps each as an `evaluate`
module (`evaluate.load("metrics/vqa_accuracy")`, offline).

Captions are tokenised as the COCO evaluation does, with the Stanford PTB tokenizer pycocoevalcap runs through Java.
Without Java a Python tokenizer following the same rules is used, and the scores say which one ran ("tokenizer").
Scales follow the COCO caption evaluation: BLEU-4 in [0, 1], CIDEr-D as pycocoevalcap reports it (0..10).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence

# --------------------------------------------------------------------------------------------- VQA normalization
# The official VQA evaluation (vqaEval.py): punctuation handling, number words up to ten, articles, contractions.

VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                   "?", "!"]
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# A subset of vqaEval's table (it maps apostrophe-less spellings to the canonical ones).
CONTRACTIONS = {"aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
                "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
                "isnt": "isn't", "itd": "it'd", "itll": "it'll", "its": "it's", "lets": "let's",
                "shouldnt": "shouldn't",
                "thats": "that's", "theres": "there's", "theyre": "they're", "wasnt": "wasn't", "werent": "weren't",
                "whats": "what's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're"}
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# vqaEval.py writes `(?!<=\d)(\.)(?!\d)`: a typo for a lookbehind, so only the lookahead acts: "2." loses its period
# (the official score treats "2." as "2"), "2.5" keeps it.
_PERIOD_NOT_IN_NUMBER = re.compile(r"\.(?!\d)")


def _strip_punctuation(text: str) -> str:
    """vqaEval's rule: a mark next to a space (or any text with a 1,000-style comma) is deleted, otherwise it becomes
    a space; periods are deleted unless a digit follows."""
    out = text
    delete = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in VQA_PUNCTUATION:
        if delete or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_IN_NUMBER.sub("", out)


def normalize_vqa_answer(answer: str) -> str:
    """"Two Red Squares." -> "2 red squares"; "The circle!" -> "circle"; "a 3" -> "3"."""
    text = _strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def vqa_exact_match(prediction: str, reference: str | Sequence[str]) -> bool:
    """Normalized exact match against one reference answer or any of several."""
    references = [reference] if isinstance(reference, str) else list(reference)
    predicted = normalize_vqa_answer(prediction)
    return any(predicted == normalize_vqa_answer(r) for r in references)


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy for the 10 human answers of VQAv2-format data: min(#humans that gave the answer / 3,
    1), averaged over the 10 leave-one-out subsets of the answers, as vqaEval.py computes it."""
    if not answers:
        raise ValueError("vqa_soft_accuracy needs at least one human answer")
    predicted = normalize_vqa_answer(prediction)
    normalized = [normalize_vqa_answer(answer) for answer in answers]
    scores = []
    for left_out in range(len(normalized)):
        others = normalized[:left_out] + normalized[left_out + 1:]
        scores.append(min(1.0, sum(answer == predicted for answer in others) / 3))
    return sum(scores) / len(scores)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Exact match (1.0 / 0.0) against a single reference, the official soft accuracy against several human answers."""
    if len(references) > 1:
        return vqa_soft_accuracy(prediction, references)
    return float(vqa_exact_match(prediction, references))


# ----------------------------------------------------------------------------------------------- caption metrics

# pycocoevalcap's PTBTokenizer drops these tokens after tokenising.
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                   "...", ";"}
PTB_JAVA, PTB_PYTHON = "ptb-java", "ptb-python"
_CONTRACTION = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_PTB_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:\.\w+)+\.|\w+(?:[-./&']\w+)*|\.\.\.|--|\S")
# brackets become PTB's escapes (lowercased with the rest, so the filter keeps them, as pycocoevalcap does)
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_PTB_QUOTES = {'"', "``", "''"}


def ptb_python_tokens(text: str) -> list[str]:
    """The PTB tokenizer's rules in Python (lowercase; "n't" and "'s"-style clitics split off; hyphenated words,
    numbers and abbreviations kept whole; punctuation split off), then pycocoevalcap's punctuation filter."""
    text = _CONTRACTION.sub(r" \1", text.lower().replace("\n", " "))
    tokens = [_PTB_BRACKETS.get(token, token) for token in _PTB_TOKEN.findall(text)]
    return [token for token in tokens if token not in PTB_PUNCTUATION and token not in _PTB_QUOTES]


def tokenize_captions(captions: dict, tokenizer: str = "auto") -> tuple[dict, str]:
    """{key: [caption, ...]} -> ({key: [tokenised caption, ...]}, tokenizer used): pycocoevalcap's PTBTokenizer (Java)
    when `tokenizer` is "ptb-java", or "auto" and Java is installed; else the Python rules."""
    if tokenizer not in ("auto", PTB_JAVA, PTB_PYTHON):
        raise ValueError(f"tokenizer must be auto, {PTB_JAVA} or {PTB_PYTHON}, got {tokenizer!r}")
    use_java = tokenizer == PTB_JAVA or (tokenizer == "auto" and shutil.which("java") is not None)
    if use_java:
        if shutil.which("java") is None:
            raise RuntimeError("the PTB tokenizer needs Java (apt-get install default-jre-headless); or pass "
                               f"tokenizer={PTB_PYTHON!r}")
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        keyed = {key: [{"caption": caption} for caption in values] for key, values in captions.items()}
        return PTBTokenizer().tokenize(keyed), PTB_JAVA
    return {key: [" ".join(ptb_python_tokens(c)) for c in values] for key, values in captions.items()}, PTB_PYTHON


def coco_caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]],
                        tokenizer: str = "auto") -> dict:
    """BLEU-1..4 and CIDEr-D over the corpus, with pycocoevalcap's Bleu(4) and Cider scorers against all references
    of each item, as the COCO caption evaluation computes them."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    _check_caption_inputs(predictions, references)
    # one tokenizer run for both sides (the Java one starts a JVM per call)
    both = {f"p{i}": [p] for i, p in enumerate(predictions)} | {f"r{i}": list(r) for i, r in enumerate(references)}
    tokenized, used = tokenize_captions(both, tokenizer)
    hypotheses = {i: tokenized[f"p{i}"] for i in range(len(predictions))}
    gold = {i: tokenized[f"r{i}"] for i in range(len(references))}
    bleu, _ = Bleu(4).compute_score(gold, hypotheses, verbose=0)
    cider, per_item = Cider().compute_score(gold, hypotheses)
    return {"bleu4": float(bleu[3]), "bleu": [float(b) for b in bleu], "cider": float(cider),
            "cider_per_item": [float(c) for c in per_item], "tokenizer": used}


def _check_caption_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no captions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"item {i}: references must be a non-empty list of captions, got {refs!r}")


# ------------------------------------------------------------------------------------------------------- POPE


def pope_answer(text: str) -> str:
    """POPE's official parsing of a free-form answer: the first sentence, commas removed; "no" when it holds the
    word "No", "no" or "not", else "yes"."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE's metrics ("yes" is the positive class): accuracy, precision, recall, F1 and the ratio of yes answers."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not predictions:
        raise ValueError("no answers to score")
    bad = [label for label in labels if label not in ("yes", "no")]
    if bad:
        raise ValueError(f"POPE labels are 'yes' or 'no', got {bad[0]!r}")
    answers = [pope_answer(p) for p in predictions]
    pairs = list(zip(answers, labels, strict=True))
    tp = pairs.count(("yes", "yes"))
    tn = pairs.count(("no", "no"))
    fp = pairs.count(("yes", "no"))
    fn = pairs.count(("no", "yes"))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": answers.count("yes") / len(answers), "questions": len(pairs)}
