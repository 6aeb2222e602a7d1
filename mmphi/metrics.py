"""Offline evaluation metrics: VQA answer normalization and exact match, corpus BLEU-4 (sacrebleu) and CIDEr-D.

No hub access: `evaluate.load("bleu")` needs the hub, so BLEU comes from sacrebleu directly and CIDEr-D is written
out here, following the coco-caption / pycocoevalcap scorer (n-grams 1..4, tf-idf with document frequencies over the
references of the evaluated set, clipped cosine similarity, Gaussian length penalty with sigma 6, x10).
Scales follow the COCO caption evaluation: BLEU-4 in [0, 1], CIDEr-D as pycocoevalcap reports it (0..10).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
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

_CAPTION_PUNCTUATION = re.compile(r"[^\w\s']|_")


def caption_tokens(text: str) -> list[str]:
    """Lowercase, punctuation removed, whitespace split (a stand-in for coco-caption's PTB tokenizer + filter)."""
    return _CAPTION_PUNCTUATION.sub(" ", text.lower()).split()


def corpus_bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus BLEU-4 with sacrebleu against all references of each item (any number per item), in [0, 1]."""
    import sacrebleu

    _check_caption_inputs(predictions, references)
    most = max(len(refs) for refs in references)
    # sacrebleu wants one stream per reference slot; None marks a slot an item does not fill.
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]
    bleu = sacrebleu.metrics.BLEU(lowercase=True)
    result = bleu.corpus_score(list(predictions), streams)
    return {"bleu4": result.score / 100.0, "bleu_precisions": [p / 100.0 for p in result.precisions],
            "bleu_brevity_penalty": result.bp, "bleu_signature": str(bleu.get_signature())}


def _ngram_counts(tokens: list[str], max_n: int = 4) -> Counter:
    return Counter(tuple(tokens[i: i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


class CiderD:
    """CIDEr-D as scored by coco-caption/pycocoevalcap: document frequencies come from the references of the evaluated
    set, so a corpus of one image scores 0 (every n-gram has idf log(1/1) = 0)."""

    def __init__(self, max_n: int = 4, sigma: float = 6.0):
        self.max_n, self.sigma = max_n, sigma

    def _vector(self, counts: Counter, document_frequency: Counter, log_num_docs: float):
        vector = [defaultdict(float) for _ in range(self.max_n)]
        norm = [0.0] * self.max_n
        length = 0
        for ngram, term_frequency in counts.items():
            n = len(ngram) - 1
            weight = float(term_frequency) * (log_num_docs - math.log(max(1.0, document_frequency[ngram])))
            vector[n][ngram] = weight
            norm[n] += weight ** 2
            if n == 1:  # pycocoevalcap counts the length in bigrams; kept for identical scores
                length += term_frequency
        return vector, [math.sqrt(x) for x in norm], length

    def _similarity(self, hyp, ref) -> list[float]:
        (vec_hyp, norm_hyp, len_hyp), (vec_ref, norm_ref, len_ref) = hyp, ref
        penalty = math.exp(-((len_hyp - len_ref) ** 2) / (2 * self.sigma ** 2))
        values = []
        for n in range(self.max_n):
            # clipped: an n-gram repeated in the hypothesis earns no more than the reference holds
            value = sum(min(weight, vec_ref[n][ngram]) * vec_ref[n][ngram] for ngram, weight in vec_hyp[n].items())
            if norm_hyp[n] != 0 and norm_ref[n] != 0:
                value /= norm_hyp[n] * norm_ref[n]
            values.append(value * penalty)
        return values

    def compute(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
        """(corpus score, per-item scores). Each item's references are all the captions of its image."""
        _check_caption_inputs(predictions, references)
        ref_counts = [[_ngram_counts(caption_tokens(r), self.max_n) for r in refs] for refs in references]
        document_frequency = Counter(ngram for refs in ref_counts for ngram in set().union(*refs))
        log_num_docs = math.log(float(len(references)))
        scores = []
        for prediction, refs in zip(predictions, ref_counts, strict=True):
            hyp = self._vector(_ngram_counts(caption_tokens(prediction), self.max_n), document_frequency, log_num_docs)
            total = [0.0] * self.max_n
            for ref in refs:
                similarity = self._similarity(hyp, self._vector(ref, document_frequency, log_num_docs))
                total = [t + s for t, s in zip(total, similarity, strict=True)]
            scores.append(sum(total) / self.max_n / len(refs) * 10.0)
        return sum(scores) / len(scores), scores


def corpus_cider(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    return CiderD().compute(predictions, references)[0]


def _check_caption_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no captions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"item {i}: references must be a non-empty list of captions, got {refs!r}")
