"""Evaluate an MM-Phi folder (or a base + PEFT adapter) offline; scores go to a JSON file and stdout.

    python scripts/evaluate_mmphi.py --task vqa --model_name_or_path outputs/instruct/merged \
        --data_path data/synthetic/llava_heldout.json --image_folder data/synthetic/images --output_file vqa.json
    python scripts/evaluate_mmphi.py --task caption --model_name_or_path outputs/projector \
        --data_path data/synthetic/captions_val.json --image_folder data/synthetic/images --output_file cap.json
    python scripts/evaluate_mmphi.py --task pope --model_name_or_path outputs/instruct/merged \
        --data_path pope/coco_pope_adversarial.json --image_folder coco/val2014 --output_file pope.json
    python scripts/evaluate_mmphi.py --task perplexity --model_name_or_path outputs/pretrain \
        --data_path data/corpus/c4.jsonl

    python scripts/evaluate_mmphi.py --task vqa --model_name_or_path outputs/instruct/merged \
        --data_path v2_OpenEnded_mscoco_val2014_questions.json --annotations_file v2_mscoco_val2014_annotations.json \
        --image_folder coco/val2014 --output_file vqav2.json

- vqa, VQAv2 (the official questions file + `--annotations_file`, 10 human answers a question; images
  `COCO_<data_subtype>_<image_id:012d>.jpg`): the official soft accuracy (vqaEval.py: min(#humans / 3, 1) over the
  10 leave-one-out subsets), overall and per answer type, comparable to VQAv2 papers; the question gets LLaVA-1.5's
  short-answer instruction (`--vqav2_instruction`).
- vqa, LLaVA format: each human turn is a question and the next gpt turn its answer; earlier turns of the same
  conversation (with their reference answers) are the context, the image comes with the first turn. Normalized exact
  match against that one answer (the output's "scoring" says so: not comparable to VQAv2's 10-answer accuracy);
  overall and per question type (the record's type field, else inferred).
  Both: greedy, batched, left-padded generation; answers normalized as the VQA evaluation does (lowercase,
  punctuation, articles, number words).
- caption: a COCO captions file; one caption per image with the projector stage's captioning prompt; BLEU-4 and
  CIDEr-D with pycocoevalcap's scorers against all references of each image (PTB tokenizer through Java, else its
  Python rules; the scores name the tokenizer).
- pope: a POPE question file (JSON lines `{"question_id", "image", "text", "label": "yes"|"no"}`); accuracy,
  precision, recall, F1 and yes-ratio, answers parsed as POPE's script does.
- perplexity: JSONL (`{"text": ...}`, also .gz/.zst/.zip) or plain-text files; token-weighted, sliding windows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, HfArgumentParser

from mmphi import data as mmphi_data
from mmphi.errors import handle_bad_record, load_json
from mmphi.inference import GenerationOptions
from mmphi.inference import generate_answers as inference_answers
from mmphi.loading import load_causal_lm, load_mmphi
from mmphi.metrics import (
    coco_caption_scores,
    normalize_vqa_answer,
    pope_answer,
    pope_scores,
    vqa_accuracy,
    vqa_exact_match,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = {"vqa": 16, "caption": 40, "pope": 16}
VQAV2_INSTRUCTION = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's VQAv2 prompt
SINGLE_REFERENCE_SCORING = "exact match against the record's one answer (not VQAv2's 10-answer accuracy)"
VQAV2_SCORING = "VQAv2 soft accuracy over 10 human answers (vqaEval.py)"
TASKS = ["vqa", "caption", "pope", "perplexity"]


@dataclass
class EvaluationArguments:
    task: str = field(metadata={"help": "what to evaluate", "choices": TASKS})
    model_name_or_path: str = field(metadata={"help": "an MM-Phi folder (or, for perplexity, any causal LM folder)"})
    data_path: list[str] = field(
        default_factory=list,
        metadata={"help": "vqa: LLaVA JSON; caption: COCO captions JSON; perplexity: JSONL/.txt files (several ok)"},
    )
    image_folder: str | None = field(default=None, metadata={"help": "where the data's image paths are relative to"})
    annotations_file: str | None = field(default=None, metadata={
        "help": "vqa: VQAv2's annotations JSON (10 answers a question), with its questions JSON as --data_path"})
    vqav2_instruction: str = field(default=VQAV2_INSTRUCTION, metadata={
        "help": "vqa on VQAv2: appended to each question (LLaVA-1.5's; '' for none)"})
    adapter: str | None = field(default=None, metadata={"help": "a PEFT adapter (instruct) applied on the model"})
    allow_other_base: bool = field(default=False, metadata={
        "help": "apply --adapter even when its run_info.json records another base than --model_name_or_path"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "run Python code in the model folder that is not this MM-Phi's own (its own files need no flag)"})
    output_file: str | None = field(default=None, metadata={"help": "write the scores here as JSON"})
    predictions_file: str | None = field(default=None, metadata={"help": "write every prediction here as JSONL"})
    batch_size: int = field(default=16, metadata={"help": "prompts (or perplexity windows) per forward"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "default: 16 for vqa, 40 for caption"})
    max_samples: int | None = field(default=None, metadata={"help": "evaluate at most this many questions/images"})
    caption_prompt: str | None = field(default=None, metadata={"help": "default: the projector's captioning prompt"})
    caption_tokenizer: str = field(default="auto", metadata={
        "help": "caption: tokenizer before BLEU/CIDEr-D", "choices": ["auto", "ptb-java", "ptb-python"]})
    max_length: int | None = field(
        default=None, metadata={"help": "perplexity window in tokens (default: the model's context, at most 2048)"}
    )
    stride: int | None = field(
        default=None,
        metadata={"help": "perplexity: tokens scored per window, < max_length (default max_length - 1: windows "
                          "overlap by one token); smaller strides give each token more context"},
    )
    skip_bad_records: bool = field(default=False, metadata={"help": "skip (and count) bad records instead of failing"})
    dtype: str = field(
        default="auto", metadata={"help": "auto (fp32 on CPU, bf16/fp16 on GPU), float32, bfloat16 or float16"}
    )
    device: str | None = field(default=None, metadata={"help": "default: cuda if available, else cpu"})


# -------------------------------------------------------------------------------------------------------- VQA

QUESTION_TYPE_PATTERNS = [  # used only when the data carries no question type
    ("colour", re.compile(r"\b(colou?r)\b")),
    ("count", re.compile(r"\bhow many\b|\bnumber of\b|\bcount\b")),
    ("shape", re.compile(r"\bshape\b|\bwhat kind of (object|figure)\b")),
    ("size", re.compile(r"\b(size|big|small|large|larger|smaller|bigger)\b")),
    ("position", re.compile(r"\bwhere\b|\bwhich (side|corner|half|part)\b|\b(left|right|top|bottom|above|below)\b")),
]


def infer_question_type(question: str, answer: str) -> str:
    normalized_answer = normalize_vqa_answer(answer)
    if normalized_answer in ("yes", "no"):
        return "yes/no"
    text = question.replace("<image>", " ").lower()
    for name, pattern in QUESTION_TYPE_PATTERNS:
        if pattern.search(text):
            return name
    return "number" if normalized_answer.isdigit() else "other"


@dataclass
class EvalItem:
    """One prompt to answer: chat messages ending in a user turn, its image (a path) and the reference(s)."""

    record_id: str
    messages: list[dict]
    image: str | None
    question: str
    references: list[str]
    location: str = ""
    turn: int = 0
    question_type: str = ""
    prediction: str = ""


def vqa_items(conversations: list[mmphi_data.Conversation]) -> list[EvalItem]:
    """One item per (human, gpt) pair; the earlier turns, with their reference answers, are the context."""
    items = []
    for conversation in conversations:
        messages = conversation.messages()
        for turn, pair in enumerate(conversation.turns):
            items.append(EvalItem(
                record_id=conversation.id, messages=messages[: 2 * turn + 1], image=conversation.image,
                question=pair.question, references=[pair.answer], location=conversation.location, turn=turn,
                question_type=pair.question_type or infer_question_type(pair.question, pair.answer),
            ))
    return items


def caption_items(images: list[mmphi_data.CaptionedImage], prompt: str) -> list[EvalItem]:
    """One item per image: the projector's captioning prompt with the image; all its captions are the references."""
    items = []
    for image in images:
        conversation = mmphi_data.Conversation(id=str(image.image_id), image=image.image,
                                               turns=[mmphi_data.Turn(prompt, "")])
        items.append(EvalItem(record_id=str(image.image_id), messages=conversation.messages()[:1], image=image.image,
                              question=prompt, references=list(image.captions), location=image.location))
    return items


def drop_unreadable_images(items: list[EvalItem], skip_bad_records: bool, report: mmphi_data.SkipReport
                           ) -> list[EvalItem]:
    """Decode every image once before generating, so a long evaluation never dies half-way on a bad file: the error
    names the record and file, or with --skip_bad_records the items are dropped and counted (a record once, not
    once per question)."""
    problems = mmphi_data.image_problems(item.image for item in items if item.image is not None)
    kept = []
    for item in items:
        problem = problems.get(item.image)
        if problem is None:
            kept.append(item)
        elif item.turn == 0 or not skip_bad_records:
            handle_bad_record(item.location, problem, skip_bad_records, report)
    return kept


def generate_answers(model, processor, items: list[EvalItem], batch_size: int, max_new_tokens: int) -> None:
    """Greedy answers into `item.prediction`, with inference's batched generation (left-padded prompts ending in
    "Assistant:" exactly as in training). Prompts are batched by length (little padding), the images of a batch are
    read with it."""
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    prompts = [processor.apply_chat_template(item.messages, add_generation_prompt=True) for item in items]
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
    batches = [order[start: start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generating", unit="batch"):
        images = [mmphi_data.load_image(items[i].image) for i in batch if items[i].image]
        inputs = processor(text=[prompts[i] for i in batch], images=images or None)
        for i, text in zip(batch, inference_answers(model, processor, inputs, options), strict=True):
            items[i].prediction = text


def score_vqa(items: list[EvalItem]) -> dict:
    by_type: dict[str, list[bool]] = defaultdict(list)
    for item in items:
        by_type[item.question_type].append(vqa_accuracy(item.prediction, item.references))
    correct = [c for results in by_type.values() for c in results]
    return {
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "questions": len(correct),
        "per_type": {
            name: {"accuracy": sum(results) / len(results), "questions": len(results)}
            for name, results in sorted(by_type.items())
        },
    }


def evaluate_vqa(args: EvaluationArguments, model, processor) -> tuple[dict, list[dict]]:
    report = mmphi_data.SkipReport()
    path = one_data_path(args)
    vqav2 = args.annotations_file is not None or is_vqav2_questions(path)
    if vqav2:
        items = vqav2_items(path, args.annotations_file, args.image_folder, args.vqav2_instruction,
                            args.skip_bad_records, report)
    else:
        conversations = mmphi_data.read_source(path, args.image_folder, args.skip_bad_records, report,
                                               data_format="llava")
        items = vqa_items(conversations)
    items = drop_unreadable_images(items[: args.max_samples], args.skip_bad_records, report)
    if not items:
        raise ValueError(f"{path}: no (question, answer) pairs to evaluate")
    generate_answers(model, processor, items, args.batch_size, args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS["vqa"])
    scores = {**score_vqa(items), "scoring": VQAV2_SCORING if vqav2 else SINGLE_REFERENCE_SCORING,
              "skipped_bad_records": report.total}
    if vqav2:  # the official results format (question_id, answer), with each question's score
        predictions = [{"question_id": int(i.record_id), "answer": i.prediction, "answer_type": i.question_type,
                        "question": i.question, "accuracy": vqa_accuracy(i.prediction, i.references)} for i in items]
    else:
        predictions = [{"id": i.record_id, "turn": i.turn, "type": i.question_type, "question": i.question,
                        "answer": i.references[0], "prediction": i.prediction,
                        "correct": vqa_exact_match(i.prediction, i.references)} for i in items]
    return scores, predictions


def is_vqav2_questions(path: str) -> bool:
    """VQAv2's questions file is one JSON object with a "questions" list (LLaVA files are a list of records)."""
    with open(path, encoding="utf-8") as handle:
        return handle.read(1).lstrip() == "{" and '"questions"' in handle.read(4096)


def read_json_object(path: str, key: str, what: str) -> dict:
    data = load_json(path)  # its existence was checked before the model loaded (check_input_paths)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: not a VQAv2 {what} (a JSON object with a {key!r} list)")
    return data


def vqav2_items(questions_path: str, annotations_path: str | None, image_folder: str | None, instruction: str,
                skip_bad_records: bool, report) -> list[EvalItem]:
    """VQAv2 questions joined to their annotations by question_id: one item per question, its 10 human answers the
    references, its answer type ("yes/no", "number", "other") the type. A question without an annotation, or an
    annotation without answers, is a bad record (named, or skipped and counted)."""
    if annotations_path is None:
        raise ValueError(f"{questions_path} is a VQAv2 questions file: pass its annotations with --annotations_file "
                         "(v2_mscoco_<split>_annotations.json)")
    questions = read_json_object(questions_path, "questions", "questions file")
    annotations = {a.get("question_id"): a for a in
                   read_json_object(annotations_path, "annotations", "annotations file")["annotations"]}
    subtype = questions.get("data_subtype")
    if not subtype:
        raise ValueError(f"{questions_path}: no \"data_subtype\" (e.g. val2014), which names the image files")
    items = []
    for index, question in enumerate(questions["questions"]):
        location = f"{questions_path}: question {index} (question_id={question.get('question_id')})"
        try:
            items.append(_vqav2_item(question, annotations, subtype, image_folder, instruction, location))
        except mmphi_data.BadRecordError as error:
            handle_bad_record(location, error, skip_bad_records, report)
    return items


def _vqav2_item(question: dict, annotations: dict, subtype: str, image_folder: str | None, instruction: str,
                location: str) -> EvalItem:
    question_id, image_id, text = question.get("question_id"), question.get("image_id"), question.get("question")
    if not isinstance(question_id, int) or not isinstance(image_id, int) or not isinstance(text, str):
        raise mmphi_data.BadRecordError("needs an integer question_id and image_id and a question string")
    annotation = annotations.get(question_id)
    if annotation is None:
        raise mmphi_data.BadRecordError("no annotation with this question_id in --annotations_file")
    answers = [a.get("answer") for a in annotation.get("answers") or [] if isinstance(a, dict)]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise mmphi_data.BadRecordError("its annotation has no answers")
    name = f"COCO_{subtype}_{image_id:012d}.jpg"
    image = os.path.join(image_folder, name) if image_folder else name
    prompt = text.strip() + instruction
    conversation = mmphi_data.Conversation(str(question_id), image, [mmphi_data.Turn(prompt, "")])
    return EvalItem(record_id=str(question_id), messages=conversation.messages()[:1], image=image, question=text,
                    references=answers, location=location, question_type=annotation.get("answer_type") or "other")


def evaluate_caption(args: EvaluationArguments, model, processor) -> tuple[dict, list[dict]]:
    report = mmphi_data.SkipReport()
    images = mmphi_data.captioned_images(mmphi_data.read_source(
        one_data_path(args), args.image_folder, args.skip_bad_records, report, data_format="coco_captions"))
    items = caption_items(images[: args.max_samples], args.caption_prompt or mmphi_data.CAPTION_PROMPT)
    items = drop_unreadable_images(items, args.skip_bad_records, report)
    if not items:
        raise ValueError(f"{one_data_path(args)}: no captioned images to evaluate")
    generate_answers(model, processor, items, args.batch_size,
                     args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS["caption"])
    captions, references = [i.prediction for i in items], [i.references for i in items]
    caption_scores = coco_caption_scores(captions, references, args.caption_tokenizer)
    del caption_scores["cider_per_item"]
    scores = {**caption_scores, "images": len(items), "skipped_bad_records": report.total}
    predictions = [{"image_id": i.record_id, "image": i.image, "prediction": i.prediction,
                    "references": i.references} for i in items]
    return scores, predictions


def pope_items(path: str, image_folder: str | None, skip_bad_records: bool, report) -> list[EvalItem]:
    """POPE questions: one yes/no question about one image per line; a bad line is named, or skipped and counted."""
    source = mmphi_data.DataSource(path=path)
    folder = image_folder if image_folder is not None else source.default_image_folder
    items = []
    for index, row in enumerate(tqdm(mmphi_data.load_rows(source), desc="reading questions", unit="question")):
        location = f"{path}: record {index}" + (f" (question_id={row.get('question_id')})"
                                                 if isinstance(row, dict) else "")
        try:
            item = _pope_item(row, folder)
        except mmphi_data.BadRecordError as error:
            handle_bad_record(location, error, skip_bad_records, report)
            continue
        item.location = location
        items.append(item)
    return items


def _pope_item(row, image_folder: str | None) -> EvalItem:
    if not isinstance(row, dict):
        raise mmphi_data.BadRecordError("record is not a JSON object")
    for key in ("image", "text", "label"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise mmphi_data.BadRecordError(f'"{key}" must be a non-empty string')
    if row["label"] not in ("yes", "no"):
        raise mmphi_data.BadRecordError(f'"label" must be "yes" or "no", got {row["label"]!r}')
    image = os.path.join(image_folder, row["image"]) if image_folder else row["image"]
    conversation = mmphi_data.Conversation(str(row.get("question_id", "")), image,
                                           [mmphi_data.Turn(row["text"].strip(), "")])
    return EvalItem(record_id=str(row.get("question_id", "")), messages=conversation.messages()[:1], image=image,
                    question=row["text"], references=[row["label"]], question_type="yes/no")


def evaluate_pope(args: EvaluationArguments, model, processor) -> tuple[dict, list[dict]]:
    report = mmphi_data.SkipReport()
    items = pope_items(one_data_path(args), args.image_folder, args.skip_bad_records, report)[: args.max_samples]
    items = drop_unreadable_images(items, args.skip_bad_records, report)
    if not items:
        raise ValueError(f"{one_data_path(args)}: no POPE questions to evaluate")
    generate_answers(model, processor, items, args.batch_size, args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS["pope"])
    scores = {**pope_scores([i.prediction for i in items], [i.references[0] for i in items]),
              "skipped_bad_records": report.total}
    predictions = [{"question_id": i.record_id, "image": i.image, "question": i.question, "label": i.references[0],
                    "prediction": i.prediction, "parsed": pope_answer(i.prediction)} for i in items]
    return scores, predictions


def one_data_path(args: EvaluationArguments) -> str:
    if len(args.data_path) != 1:
        raise ValueError(f"--task {args.task} takes one --data_path file, got {len(args.data_path)}")
    return args.data_path[0]


# ------------------------------------------------------------------------------------------------- perplexity

def read_text_documents(paths: list[str], skip_bad_records: bool):
    """Documents of JSONL files (via text_data, with its bad-record handling) or whole plain-text files."""
    from mmphi.data.corpus import SkipReport, is_jsonl_name, iter_jsonl_records

    report = SkipReport()
    documents = []
    for path in paths:
        if is_jsonl_name(path) or path.endswith(".zip"):
            documents += [r["text"] for r in iter_jsonl_records(path, skip_bad_records, report)]
            continue
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        if text.strip():
            documents.append(text)
        elif skip_bad_records:
            report.add(path, "empty file")
        else:
            raise ValueError(f"{path}: empty file (pass --skip_bad_records to skip it)")
    return documents, report


def perplexity_windows(token_ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], int]]:
    """(window, number of tokens scored at its end): every token after the first is scored exactly once, each with
    the `max_length - 1` tokens before it as context at most (HF's strided perplexity, without its unscored gaps)."""
    if not 0 < stride < max_length:
        raise ValueError(f"the stride must be in 1..max_length - 1 ({max_length - 1}), got {stride}")
    windows, scored_until = [], 1  # token 0 has no context to be predicted from
    while scored_until < len(token_ids):
        end = min(scored_until + stride, len(token_ids))
        windows.append((token_ids[max(0, end - max_length): end], end - scored_until))
        scored_until = end
    return windows


@torch.no_grad()
def evaluate_perplexity(args: EvaluationArguments, model, tokenizer) -> tuple[dict, list[dict]]:
    documents, report = read_text_documents(args.data_path, args.skip_bad_records)
    documents = documents[: args.max_samples]
    if not documents:
        raise ValueError(f"{args.data_path}: no text to evaluate")
    context = getattr(model.config.get_text_config(), "max_position_embeddings", 2048)
    max_length = args.max_length or min(context, 2048)
    stride = args.stride or max_length - 1
    eos = tokenizer.eos_token_id
    bos = eos if tokenizer.bos_token_id is None else tokenizer.bos_token_id
    windows = []
    for text in documents:  # BOS gives the first word a context; predicting the final EOS is part of the text
        token_ids = [bos] + tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        windows += perplexity_windows(token_ids, max_length, stride)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    windows.sort(key=lambda w: len(w[0]))
    for start in range(0, len(windows), args.batch_size):
        batch = windows[start: start + args.batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for row, (ids, new) in enumerate(batch):  # right padding: positions stay those of an unpadded window
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            labels[row, len(ids) - new: len(ids)] = torch.tensor(ids[len(ids) - new:])
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
        targets = labels[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="sum",
                                                ignore_index=-100)
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
    mean_nll = total_nll / total_tokens
    return {"perplexity": math.exp(mean_nll) if mean_nll < 700 else math.inf, "loss": mean_nll,
            "tokens": total_tokens, "documents": len(documents), "max_length": max_length, "stride": stride,
            "skipped_bad_records": report.total}, []


# ------------------------------------------------------------------------------------------------------- main

def run_evaluation(args: EvaluationArguments) -> dict:
    if not args.data_path:
        raise ValueError("--data_path is required")
    check_input_paths(args)  # before minutes of model loading at real size
    started = time.perf_counter()
    if args.task == "perplexity":  # any causal LM (a pretrained Phi too): no processor needed
        model = load_causal_lm(args.model_name_or_path, adapter=args.adapter, device=args.device, dtype=args.dtype,
                               allow_other_base=args.allow_other_base, trust_remote_code=args.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(args.adapter or args.model_name_or_path)
        scores, predictions = evaluate_perplexity(args, model, tokenizer)
    else:
        model, processor = load_mmphi(args.model_name_or_path, adapter=args.adapter, device=args.device,
                                      dtype=args.dtype, allow_other_base=args.allow_other_base,
                                      trust_remote_code=args.trust_remote_code)
        evaluate_task = {"vqa": evaluate_vqa, "caption": evaluate_caption, "pope": evaluate_pope}[args.task]
        scores, predictions = evaluate_task(args, model, processor)
    result = {"task": args.task, "model": args.model_name_or_path, "adapter": args.adapter,
              "data": args.data_path, **scores, "seconds": round(time.perf_counter() - started, 2)}
    write_outputs(args, result, predictions)
    return result


def check_input_paths(args: EvaluationArguments) -> None:
    for flag, path in [*(("--data_path", p) for p in args.data_path), ("--annotations_file", args.annotations_file)]:
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path}: no such file")
    if args.image_folder is not None and not os.path.isdir(args.image_folder):
        raise FileNotFoundError(f"--image_folder {args.image_folder}: no such folder")


def write_outputs(args: EvaluationArguments, result: dict, predictions: list[dict]) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if args.output_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
        with open(args.output_file, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    if args.predictions_file and predictions:
        os.makedirs(os.path.dirname(os.path.abspath(args.predictions_file)), exist_ok=True)
        with open(args.predictions_file, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(p) + "\n" for p in predictions)


def parse_args(argv: list[str] | None = None) -> EvaluationArguments:
    parser = HfArgumentParser(EvaluationArguments)
    argv = sys.argv[1:] if argv is None else argv
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    logger.info("evaluating: %s", asdict(args))
    return run_evaluation(args)


if __name__ == "__main__":
    from mmphi.errors import run_command

    run_command(main)
