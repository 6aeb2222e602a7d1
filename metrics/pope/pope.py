"""POPE (Polling-based Object Probing Evaluation): yes/no questions about objects; free-form answers parsed as the
official script does (first sentence; "no" if it holds No/no/not), "yes" the positive class. Offline:
`evaluate.load("metrics/pope")`."""

import datasets
import evaluate

from mmphi.metrics import pope_scores

_CITATION = """@inproceedings{li2023pope, title={Evaluating Object Hallucination in Large Vision-Language Models},
author={Li, Yifan and Du, Yifan and Zhou, Kun and Wang, Jinpeng and Zhao, Wayne Xin and Wen, Ji-Rong},
booktitle={EMNLP}, year={2023}}"""

_INPUTS = """
Args:
    predictions: list of str, the model's answers (free-form).
    references: list of str, "yes" or "no".
Returns:
    accuracy, precision, recall, f1, yes_ratio, questions.
"""


class Pope(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation=_CITATION, inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            reference_urls=["https://github.com/RUCAIBox/POPE"],
        )

    def _compute(self, predictions, references):
        return pope_scores(predictions, references)
