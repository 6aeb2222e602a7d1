"""The lmms-eval adapter: `lmms-eval --model mmphi` (found through the `lmms_eval.models` entry point) runs a local
image task end to end, answering as MM-Phi's own evaluation does; loglikelihood scores continuations."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from mmphi.build import build_tiny, save_mmphi
from mmphi.data import Conversation, Turn
from mmphi.data.synthetic import generate
from mmphi.evaluation import EvalItem, generate_answers
from mmphi.loading import load_mmphi

pytest.importorskip("lmms_eval", reason="`make install` installs lmms-eval")

TASK = """dataset_path: {dataset}
task: mmphi_tiny_shapes
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

UTILS = '''def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tiny MM-Phi, a hub-style parquet dataset (embedded images) and an lmms-eval task over it."""
    root = tmp_path_factory.mktemp("lmms")
    save_mmphi(*build_tiny(seed=0), str(root / "model"))
    data = generate(str(root / "synthetic"), num_images=6, val_fraction=0.0, seed=1)
    records = [r for r in json.loads(Path(data["llava_train"]).read_text()) if "image" in r][:5]
    rows = [{"question_id": n, "question": r["conversations"][0]["value"].replace("<image>", "").strip(),
             "answer": r["conversations"][1]["value"].lower(),
             "image": Image.open(Path(data["images"]) / r["image"]).convert("RGB"), "path": r["image"]}
            for n, r in enumerate(records)]
    (root / "dataset" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(root / "dataset" / "data" / "test-00000-of-00001.parquet"))
    (root / "tasks").mkdir()
    (root / "tasks" / "mmphi_tiny_shapes.yaml").write_text(TASK.format(dataset=root / "dataset"))
    (root / "tasks" / "utils.py").write_text(UTILS)
    return root, data, rows


def test_lmms_eval_cli_runs_a_local_task_with_mmphi_answers(task):
    root, data, rows = task
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "mmphi", "--model_args", f"pretrained={root / 'model'}",
         "--tasks", "mmphi_tiny_shapes", "--include_path", str(root / "tasks"), "--batch_size", "2",
         "--output_path", str(root / "out"), "--log_samples"],
        capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((root / "out").rglob("*_results.json")).read_text())
    samples = [json.loads(line) for line in next((root / "out").rglob("*mmphi_tiny_shapes*.jsonl")).read_text()
               .splitlines()]
    logged = {s["doc_id"]: _text(s["filtered_resps"]) for s in samples}
    assert len(logged) == len(rows)

    # the same questions through MM-Phi's own evaluation path (image files, not the parquet's embedded copies)
    model, processor = load_mmphi(str(root / "model"))
    items = [EvalItem(record_id=str(r["question_id"]), image=str(Path(data["images"]) / r["path"]),
                      messages=Conversation("", str(Path(data["images"]) / r["path"]),
                                            [Turn(r["question"], "")]).messages()[:1],
                      question=r["question"], references=[r["answer"]]) for r in rows]
    generate_answers(model, processor, items, batch_size=2, max_new_tokens=4)
    assert [logged[i] for i in range(len(rows))] == [item.prediction for item in items]
    expected = sum(item.prediction.lower() == r["answer"] for item, r in zip(items, rows, strict=True)) / len(rows)
    assert results["results"]["mmphi_tiny_shapes"]["exact_match,none"] == pytest.approx(expected)


def _text(response):
    """A logged response: the text itself, or the list of one request's texts."""
    while isinstance(response, list):
        (response,) = response
    return response


def test_loglikelihood_marks_the_greedy_continuation(task):
    """lmms-eval's loglikelihood contract: (log P(continuation | prompt), is the continuation the greedy one)."""
    from lmms_eval.api.instance import Instance

    from mmphi.inference import Chat, ChatTurn, prepare_inputs
    from mmphi.lmms_eval_model import MMPhi

    root, _, rows = task
    adapter = MMPhi(pretrained=str(root / "model"))
    docs = {"test": rows}
    adapter.task_dict = {"t": docs}

    def request(kind, arguments):
        return Instance(request_type=kind, arguments=arguments, idx=0,
                        metadata={"task": "t", "doc_id": arguments[3], "repeats": 1})

    def visual(doc):
        return [doc["image"]]

    greedy = adapter.generate_until([request("generate_until", (rows[0]["question"], {"max_new_tokens": 1}, visual,
                                                                0, "t", "test"))])[0]
    assert greedy
    # the greedy token exactly as the model would write it (generate_until strips it; a random model's token need
    # not start with a space)
    inputs, _ = prepare_inputs(adapter.processor, [Chat()], [ChatTurn(rows[0]["question"], image=[rows[0]["image"]])])
    with torch.inference_mode():
        token = adapter.model(**inputs).logits[0, -1].argmax().item()
    continuation = adapter.processor.tokenizer.decode([token])
    assert continuation.strip() == greedy
    (ll_greedy, is_greedy), (ll_other, other_greedy) = adapter.loglikelihood([
        request("loglikelihood", (rows[0]["question"], continuation, visual, 0, "t", "test")),
        request("loglikelihood", (rows[0]["question"], " zebra", visual, 0, "t", "test")),
    ])
    assert is_greedy and not other_greedy
    assert ll_other < ll_greedy <= 0
