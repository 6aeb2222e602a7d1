"""BLEU-1..4 and CIDEr-D as the COCO caption evaluation computes them: pycocoevalcap's own Bleu(4) and Cider scorers,
captions tokenised with its Stanford PTB tokenizer (Java) or, without Java, a Python tokenizer following the same
rules; the result says which ("tokenizer"). Offline: `evaluate.load("metrics/coco_caption")`."""

import datasets
import evaluate

from mmphi.metrics import coco_caption_scores

_CITATION = """@inproceedings{vedantam2015cider, title={CIDEr: Consensus-based Image Description Evaluation},
author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi}, booktitle={CVPR}, year={2015}}
@article{chen2015microsoft, title={Microsoft COCO Captions: Data Collection and Evaluation Server}, author={Chen,
Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and Dollar, Piotr and Zitnick,
C. Lawrence}, journal={arXiv:1504.00325}, year={2015}}"""

_INPUTS = """
Args:
    predictions: list of str, one caption per image.
    references: list of list of str, all reference captions of each image.
    tokenizer: "auto" (Java PTB when Java is installed), "ptb-java" or "ptb-python".
Returns:
    bleu4, bleu (BLEU-1..4), cider (CIDEr-D, 0..10 as pycocoevalcap reports it), cider_per_item, tokenizer.
"""


class CocoCaption(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation=_CITATION, inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.List(datasets.Value("string"))}),
            reference_urls=["https://github.com/salaniz/pycocoevalcap"],
        )

    def _compute(self, predictions, references, tokenizer="auto"):
        return coco_caption_scores(predictions, references, tokenizer)
