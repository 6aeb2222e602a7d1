"""VQA accuracy as the official VQA evaluation (vqaEval.py) computes it: answers normalised (punctuation, number
words, articles, contractions); against 10 human answers the soft accuracy min(#matching / 3, 1) averaged over the
leave-one-out subsets, against a single reference exact match. Offline: `evaluate.load("metrics/vqa_accuracy")`."""

import datasets
import evaluate

from mmphi.metrics import vqa_accuracy

_CITATION = """@inproceedings{antol2015vqa, title={VQA: Visual Question Answering}, author={Antol, Stanislaw and
Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and Batra, Dhruv and Zitnick, C. Lawrence and Parikh, Devi},
booktitle={ICCV}, year={2015}}"""

_INPUTS = """
Args:
    predictions: list of str, the model's answers.
    references: list of list of str, each question's reference answers (10 human answers for VQAv2, or one).
Returns:
    accuracy: the mean VQA accuracy in [0, 1]; questions: how many were scored.
"""


class VQAAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation=_CITATION, inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.List(datasets.Value("string"))}),
            reference_urls=["https://github.com/GT-Vision-Lab/VQA/blob/master/PythonEvaluationTools/vqaEvaluation/"
                            "vqaEval.py"],
        )

    def _compute(self, predictions, references):
        scores = [vqa_accuracy(p, r) for p, r in zip(predictions, references, strict=True)]
        return {"accuracy": sum(scores) / len(scores) if scores else 0.0, "questions": len(scores)}
