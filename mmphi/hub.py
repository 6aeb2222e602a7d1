"""Share an MM-Phi folder on the Hugging Face Hub with a generated model card.

    python scripts/push_to_hub.py --model outputs/instruct/merged --repo_id you/mmphi --private
    python scripts/push_to_hub.py --model outputs/instruct/merged --repo_id you/mmphi --metrics vqa.json \
        --dry_run --output_dir outputs/to-upload

What is uploaded: the folder's top-level model files (config, safetensors weights, tokenizer/processor files, chat
template, the remote-code .py files, JSON/PNG results), plus README.md, the model card. Never uploaded: sub-folders
(checkpoint-*, runs/), pickled weights or training state (*.bin, *.pt, *.pth, *.pkl, *.ckpt). Code files the config
refers to but the folder lacks are added from this repository, so the repo loads with `trust_remote_code=True`.

The card lists the components (read from config.json and the safetensors headers), the training stages and their
data, the scores of `scripts/evaluate_mmphi.py` (its JSON outputs found in the folder, recognised by their "task"
field, and any --metrics FILE), a per-stage summary when the folder has `training_summary.json` (or
--training_summary FILE: a list of rows such as {"stage", "steps", "time_s", "final_loss", "accuracy"}), and a usage
snippet.

--dry_run writes exactly the files that would be uploaded to --output_dir and uploads nothing. The real upload uses
huggingface_hub's `HfApi.create_repo` + `upload_folder` (token from `huggingface-cli login` / HF_TOKEN / --token).
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from mmphi.errors import load_json
from mmphi.loading import CODE_FILES, is_model_file

logger = logging.getLogger(__name__)
EVALUATE_TASKS = ("vqa", "caption", "pope", "perplexity")
TRAINING_SUMMARY = "training_summary.json"
RUN_INFO = "run_info.json"  # written by every stage (mmphi.training.describe_run)
ADAPTER_CONFIG = "adapter_config.json"
# The remote code (modeling_mmphi.py etc.) runs on these transformers versions (setup.cfg's bound).
REQUIRED_TRANSFORMERS = ">=5.23,<6"
# model-index: (task type, the scores' metric keys) per evaluation task
MODEL_INDEX_TASKS = {"vqa": ("visual-question-answering", ("accuracy",)),
                     "caption": ("image-to-text", ("bleu4", "cider")),
                     "pope": ("visual-question-answering", ("accuracy", "f1")),
                     "perplexity": ("text-generation", ("perplexity",))}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CARD_TAGS = ["mmphi", "multimodal", "vision-language", "llava", "phi-2", "tinyclip", "speech", "custom_code"]

# The recipe each stage follows at real scale (README "At real size"): the card shows it as what the
# scripts do, never as a claim about the weights; what this folder's run did comes from run_info.json.
STAGES = [
    ("pretrain", "Pretrain Phi-2 from scratch (optional: the released microsoft/phi-2 can be used instead)",
     "RedPajama (cc + c4 samples, `{\"text\": ...}` JSONL), packed blocks", "all of the language model"),
    ("projector", "Projector pretraining (caption the image)", "COCO 2017 captions",
     "the projector only (vision tower and language model frozen)"),
    ("instruct",
     "Instruction tuning, QLoRA (nf4 language model, LoRA r=64 alpha=16 on q/k/v/dense/fc1/fc2), then merged",
     "LLaVA-Instruct-150K (multi-turn, loss on answers + EOS only)", "LoRA adapters + projector"),
]


# --- what to upload ----------------------------------------------------------------------------------------------


def is_adapter_folder(model_dir: str) -> bool:
    return not os.path.isfile(os.path.join(model_dir, "config.json")) and \
        os.path.isfile(os.path.join(model_dir, ADAPTER_CONFIG))


def check_model_folder(model_dir: str) -> dict:
    """The folder's config after checking it: a complete model, or an instruct LoRA adapter with its processor (then
    the adapter config); never pickled weights only."""
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: no such folder")
    names = os.listdir(model_dir)
    if is_adapter_folder(model_dir):
        if "adapter_model.safetensors" not in names:
            raise ValueError(f"{model_dir}: an adapter without adapter_model.safetensors; only safetensors are "
                             "uploaded")
        if "processor_config.json" not in names:
            raise ValueError(f"{model_dir}: an adapter without its processor (instruct saves one next to it); push "
                             "the merged folder, or save the processor here")
        return load_json(os.path.join(model_dir, ADAPTER_CONFIG))
    if not os.path.isfile(config_path):
        raise ValueError(f"{model_dir}: no config.json (not a model folder)")
    if not any(name.endswith(".safetensors") for name in names):
        pickled = [n for n in names if fnmatch.fnmatch(n, "*.bin") or fnmatch.fnmatch(n, "*.pt")]
        hint = f" (found {', '.join(sorted(pickled))}: re-save with save_pretrained)" if pickled else ""
        raise ValueError(f"{model_dir}: no safetensors weights{hint}; only safetensors are uploaded")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    if "processor_config.json" not in names and "preprocessor_config.json" not in names:
        logger.warning("%s has no processor files: AutoProcessor will not load from the pushed repo", model_dir)
    return config


def select_files(model_dir: str, evaluation_files: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(files to upload, files left out): the model folder's own files (`mmphi.loading.MODEL_FOLDER_FILES`), plus its
    evaluation outputs; anything else (notes, tokens, logs, helper scripts, dotfiles), sub-folders and links (which
    could point anywhere) stay local."""
    chosen, left_out = [], []
    evaluations = set(evaluation_files)
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if os.path.islink(path):
            left_out.append(name + " (a link)")
        elif os.path.isdir(path):
            left_out.append(name + "/")
        elif name in evaluations or is_model_file(name):
            chosen.append(name)
        else:
            left_out.append(name)
    return chosen, left_out


def missing_code_files(config: dict, present: list[str]) -> list[str]:
    """Remote-code modules the auto_map names (plus the speech module the processor imports) that the folder lacks;
    an adapter's processor needs the processor's."""
    if ADAPTER_CONFIG in present and "config.json" not in present:
        config = {"auto_map": {"AutoProcessor": "processing_mmphi.MMPhiProcessor"}}
    needed = {ref.split(".")[0] + ".py" for ref in (config.get("auto_map") or {}).values() if isinstance(ref, str)}
    if "processing_mmphi.py" in needed or "processing_mmphi.py" in present:
        needed.add("speech_mmphi.py")  # imported lazily, so save_pretrained does not copy it
    return sorted(name for name in needed if name not in present and name in CODE_FILES)


def stage_upload(model_dir: str, staging_dir: str, card: str, metrics_files: list[str],
                 evaluation_files: Iterable[str] = ()) -> list[str]:
    """Copy exactly what will be uploaded into `staging_dir`: the chosen files, missing code files, the metrics
    files given on the command line, and README.md. Returns the staged file names."""
    config = check_model_folder(model_dir)
    chosen, left_out = select_files(model_dir, evaluation_files)
    if left_out:
        logger.info("not uploaded: %s", ", ".join(left_out))
    os.makedirs(staging_dir, exist_ok=True)
    for name in chosen:
        shutil.copy2(os.path.join(model_dir, name), os.path.join(staging_dir, name))
    for name in missing_code_files(config, chosen):
        source = importlib.util.find_spec(name.removesuffix(".py")).origin  # the installed model file
        logger.info("adding %s from %s (the config refers to it)", name, source)
        shutil.copy2(source, os.path.join(staging_dir, name))
    for path in metrics_files:
        target = os.path.join(staging_dir, os.path.basename(path))
        if not os.path.exists(target):
            shutil.copy2(path, target)
    with open(os.path.join(staging_dir, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)
    return sorted(os.listdir(staging_dir))


# --- the model card ----------------------------------------------------------------------------------------------


def find_evaluations(model_dir: str, extra_files: list[str]) -> list[tuple[str, dict]]:
    """(file name, scores) of scripts/evaluate_mmphi.py outputs: the folder's JSON files with a known "task", then
    --metrics files (which must be evaluate.py outputs)."""
    found = []
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name.endswith(".json") and os.path.isfile(path) and not os.path.islink(path):
            try:
                data = load_json(path)
            except ValueError:
                continue  # not ours to judge: only evaluation outputs matter here
            if isinstance(data, dict) and data.get("task") in EVALUATE_TASKS:
                found.append((name, data))
    for path in extra_files:
        data = load_json(path)
        if not isinstance(data, dict) or data.get("task") not in EVALUATE_TASKS:
            raise ValueError(f"{path}: not a scripts/evaluate_mmphi.py output "
                             f"(needs \"task\": one of {EVALUATE_TASKS})")
        if os.path.basename(path) not in {name for name, _ in found}:
            found.append((os.path.basename(path), data))
    return found


def data_sources(data: dict) -> list[str]:
    """The `data` an evaluation JSON names, as a list."""
    sources = data.get("data") or []
    return [str(source) for source in (sources if isinstance(sources, list) else [sources])]


def model_index(evaluations: list[tuple[str, dict]]) -> list[EvalResult]:
    """The evaluation JSONs as model-index entries (what the Hub shows as the model's results): only those scored on
    a Hub dataset, which a reader can look up; a local file (the demo's synthetic shapes, say) is no benchmark."""
    results = []
    for _, data in evaluations:
        task_type, metrics = MODEL_INDEX_TASKS[data["task"]]
        datasets = hub_ids(data_sources(data))
        if not datasets:
            continue
        dataset = datasets[0]
        results += [EvalResult(task_type=task_type, dataset_type=dataset, dataset_name=dataset, metric_type=metric,
                               metric_value=data[metric]) for metric in metrics
                    if isinstance(data.get(metric), (int, float)) and math.isfinite(data[metric])]
    return results


def table_cell(value) -> str:
    """A value as one Markdown table cell: numbers formatted, lists and dicts as JSON, `|` escaped, one line."""
    text = json.dumps(value) if isinstance(value, (list, dict)) else format_number(value)
    return text.replace("|", "\\|").replace("\n", " ")


def format_number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:.4g}"


def flatten_scores(scores: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Nested scores -> (dotted name, number) rows, e.g. per_type.colour.accuracy."""
    rows = []
    for key, value in scores.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += flatten_scores(value, name + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((name, value))
    return rows


def evaluation_section(evaluations: list[tuple[str, dict]]) -> str:
    if not evaluations:
        return "No evaluation results were given (run `scripts/evaluate_mmphi.py` and pass `--metrics FILE`).\n"
    parts = []
    for name, data in evaluations:
        sources = data_sources(data)
        hub = hub_ids(sources)
        source = ", ".join(f"`{d}`" if d in hub else f"`{os.path.basename(d)}` (a local file)" for d in sources)
        parts.append(f"**{data['task']}** on {source or 'unspecified data'} (from `{name}`, written by "
                     "`scripts/evaluate_mmphi.py`):\n")
        if data.get("scoring"):
            parts.append(f"Scoring: {data['scoring']}.\n")
        parts.append("| metric | value |\n| --- | --- |")
        parts += [f"| {table_cell(metric)} | {table_cell(value)} |" for metric, value in flatten_scores(data)]
        parts.append("")
    return "\n".join(parts) + "\n"


def training_summary_section(summary) -> str:
    rows = summary.get("stages", summary) if isinstance(summary, dict) else summary
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows) or not rows:
        raise ValueError("the training summary must be a list of objects (one row per stage) or {\"stages\": [...]}")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(table_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\nThis run:\n\n" + "\n".join(lines) + "\n"  # the blank line ends the table before it


def read_run(model_dir: str) -> tuple[dict | None, dict | None]:
    """(run_info.json, trainer_state.json) of the folder, each None when absent."""
    found = []
    for name in (RUN_INFO, "trainer_state.json"):
        path = os.path.join(model_dir, name)
        found.append(load_json(path) if os.path.isfile(path) else None)
    return found[0], found[1]


def final_losses(state: dict | None) -> dict:
    """Steps and the last logged training / evaluation losses of a trainer_state.json."""
    if not state:
        return {}
    history = state.get("log_history") or []
    last = {}
    for key, name in (("loss", "final training loss (last logged)"), ("train_loss", "mean training loss"),
                      ("eval_loss", "final evaluation loss")):
        values = [entry[key] for entry in history if isinstance(entry.get(key), (int, float))]
        if values:
            last[name] = values[-1]
    return {"steps": state.get("global_step"), **last}


def run_section(run: dict | None, state: dict | None, adapter: dict | None) -> str:
    """What this folder's own run did, from its record; nothing when there is none."""
    if run is None:
        return ("This folder carries no training record (`run_info.json`, written by every MM-Phi stage), so this "
                "card claims no training for these weights.\n")
    rows = [("stage", run.get("stage")), ("started from", run.get("base_model") or "random initialisation")]
    rows += [(f"data: {key}", value) for key, value in (run.get("data") or {}).items()]
    rows += list(final_losses(state).items())
    rows += [(key, value) for key, value in (run.get("training") or {}).items()]
    lora = adapter or run.get("lora")
    if lora:
        keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save") if adapter else lora.keys()
        rows += [(f"LoRA {key}", lora.get(key)) for key in keys if lora.get(key) is not None]
    if run.get("merged"):
        rows.append(("merged", f"LoRA folded into the {run.get('merge_into', 'dequantized')} weights"))
    rows += [(f"{name} version", version) for name, version in (run.get("versions") or {}).items()]
    lines = ["| | |", "| --- | --- |"]
    lines += [f"| {table_cell(name)} | {table_cell(value)} |" for name, value in rows if value is not None]
    return "This folder's run (from `run_info.json` and `trainer_state.json`):\n\n" + "\n".join(lines) + "\n"


def hub_ids(values) -> list[str]:
    """The values that name hub repos (the card metadata may only name those, not local paths)."""
    values = values if isinstance(values, list) else [values]
    return [v for v in values if isinstance(v, str) and HUB_ID.match(v) and not os.path.exists(v)]


def count_parameters(model_dir: str) -> dict[str, int]:
    """Parameters per component, from the safetensors headers (no weights are loaded)."""
    from safetensors import safe_open

    counts = {"vision tower": 0, "projector": 0, "language model": 0, "lm head": 0, "other": 0}
    prefixes = {"model.vision_tower.": "vision tower", "model.multi_modal_projector.": "projector",
                "model.language_model.": "language model", "lm_head.": "lm head"}
    for name in sorted(os.listdir(model_dir)):
        if not name.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(model_dir, name), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                numel = math.prod(handle.get_slice(key).get_shape())
                part = next((p for prefix, p in prefixes.items() if key.startswith(prefix)), "other")
                counts[part] += numel
    return {part: n for part, n in counts.items() if n}


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def components_section(config: dict, counts: dict[str, int]) -> str:
    vision, text = config.get("vision_config", {}), config.get("text_config", {})
    image_tokens = config.get("image_seq_length")
    projector = config.get("projector_type", "linear")
    shape = {"linear": "Linear", "mlp2x_gelu": "Linear-GELU-Linear"}.get(projector, projector)
    rows = [
        ("vision tower", f"CLIP ViT: {vision.get('num_hidden_layers')} layers, hidden {vision.get('hidden_size')}, "
         f"{vision.get('image_size')} px, patch {vision.get('patch_size')} -> {image_tokens} image tokens "
         f"(layer {config.get('vision_feature_layer')}, strategy `{config.get('vision_feature_select_strategy')}`)"),
        ("projector", f"`{projector}` ({shape} {vision.get('hidden_size')} -> {text.get('hidden_size')})"),
        ("language model", f"Phi: {text.get('num_hidden_layers')} layers, hidden {text.get('hidden_size')}, "
         f"{text.get('num_attention_heads')} heads, vocabulary {text.get('vocab_size')}, "
         f"context {text.get('max_position_embeddings')}"),
        ("speech (not in the weights)", "Whisper via faster-whisper/WhisperX: the first 10 s of audio are "
         "transcribed and the transcript joins the prompt as text (`speech_mmphi.py`)"),
    ]
    lines = ["| component | what | parameters |", "| --- | --- | --- |"]
    for part, what in rows:
        lines.append(f"| {part} | {what} | {human_count(counts[part]) if part in counts else ''} |")
    total = sum(counts.values())
    lines.append(f"| **total** | weights stored as safetensors ({config.get('dtype') or 'float32'}) | "
                 f"**{human_count(total)}** |")
    note = ""
    if text.get("hidden_size") != 2560:
        note = ("\nThis is a scaled-down configuration (Phi-2 itself has 32 layers and hidden size 2560): a small "
                "demonstration model whose answers are only meaningful on the kind of data it was trained on.\n")
    return "\n".join(lines) + "\n" + note


def usage_section(repo_id: str) -> str:
    return f"""```python
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True, dtype="auto")
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)

messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the picture?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, images=Image.open("photo.jpg")).to(model.device)
output = model.generate(**inputs, max_new_tokens=64)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```

A spoken question (needs `pip install faster-whisper`): add `{{"type": "audio"}}` to the message's
content and pass `audio="question.wav"` to the processor. It transcribes the first 10 s with Whisper (large-v2 by
default; choose with `processor.get_transcriber(model_name_or_path=...)`, loaded once) and returns the transcripts as
`inputs.transcripts`. 4-bit: pass `quantization_config=BitsAndBytesConfig(load_in_4bit=True)` (only the language model
is quantized). Prompt format, per turn: `User: <image>\\nQUESTION\\nAssistant: ANSWER<|endoftext|>`.
"""


def describe_target_modules(target_modules) -> str:
    """PEFT's `target_modules`: a list of module names, or one regular expression over the full module names."""
    if isinstance(target_modules, str):
        return f"the modules matching `{target_modules}`"
    return ", ".join(sorted(target_modules or [])) or "no modules"


def adapter_components_section(adapter: dict, model_dir: str) -> str:
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, "adapter_model.safetensors"), framework="pt") as handle:
        total = sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118
    return (f"A LoRA adapter (PEFT; r={adapter.get('r')}, alpha={adapter.get('lora_alpha')}, on "
            f"{describe_target_modules(adapter.get('target_modules'))}; also trained: "
            f"{', '.join(adapter.get('modules_to_save') or []) or 'nothing else'}) with the processor: "
            f"{human_count(total)} parameters, on top of `{adapter.get('base_model_name_or_path')}`.\n")


def part_section(config: dict, model_dir: str) -> str:
    total = sum(count_parameters(model_dir).values())
    return (f"One part of MM-Phi, not the multimodal model: a `{config.get('model_type')}` model "
            f"({', '.join(config.get('architectures') or [])}), {human_count(total)} parameters, stored as "
            "safetensors.\n")


def part_usage_section(repo_id: str, config: dict) -> str:
    auto = "AutoModelForCausalLM" if config.get("model_type") == "phi" else "AutoModel"
    return f"""```python
from transformers import {auto}

model = {auto}.from_pretrained("{repo_id}")
```
"""


def adapter_usage_section(repo_id: str, base: str) -> str:
    note = ""
    if not hub_ids(base):  # trained on a local folder: a path that means nothing on a reader's machine
        note = (f"The adapter was trained on a local base folder (`{os.path.basename(os.path.normpath(base))}`): push "
                "that folder too (`scripts/push_to_hub.py`) and put its repo id where the snippet says BASE_REPO.\n\n")
        base = "BASE_REPO"
    return note + f"""```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoProcessor

base = AutoModelForCausalLM.from_pretrained("{base}", trust_remote_code=True, dtype="auto")
model = PeftModel.from_pretrained(base, "{repo_id}")
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
```

Or chat with it unmerged: `python scripts/chat.py --model {base} --adapter {repo_id} --image photo.jpg "..."`.
"""


def limitations_section(config: dict) -> str:
    text = config.get("text_config", {}) if isinstance(config, dict) else {}
    small = text and text.get("hidden_size") != 2560
    lines = [
        "- English only; answers are short and can be wrong or made up about the image (no preference tuning, no "
        "safety tuning).",
        "- One CLIP view per image at the tower's resolution: small text and fine detail are lost.",
        "- Speech: only the first 10 s of a clip are transcribed, by a separate Whisper model.",
    ]
    if small:
        lines.insert(0, "- A scaled-down demonstration model: meaningful only on the kind of data it was trained on.")
    return "\n".join(lines) + "\n"


def build_card(model_dir: str, repo_id: str, evaluations, summary=None, license_id: str = "mit",
               base_models: list[str] | None = None) -> str:
    config = check_model_folder(model_dir)
    run, state = read_run(model_dir)
    adapter = config if is_adapter_folder(model_dir) else None
    bases = base_models or hub_ids((adapter or {}).get("base_model_name_or_path") or (run or {}).get("base_model"))
    datasets = hub_ids([v for v in ((run or {}).get("data") or {}).values() if isinstance(v, str)])
    name = repo_id.split("/")[-1]
    data = ModelCardData(
        license=license_id,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="image-text-to-text",
        tags=CARD_TAGS,
        base_model=bases or None,
        datasets=datasets or None,
        model_name=name,
        eval_results=model_index(evaluations) or None,
    )
    stages = ["| stage | what | data | trained |", "| --- | --- | --- | --- |"]
    stages += [f"| {name} | {what} | {source} | {trained} |" for name, what, source, trained in STAGES]
    summary_text = training_summary_section(summary) if summary is not None else ""
    base_for_usage = (adapter or {}).get("base_model_name_or_path") or "BASE"
    if adapter:
        components, usage = adapter_components_section(adapter, model_dir), adapter_usage_section(repo_id,
                                                                                                  base_for_usage)
    elif config.get("model_type") != "mmphi":  # a pretrained Phi or the offline CLIP: one part of MM-Phi
        components, usage = part_section(config, model_dir), part_usage_section(repo_id, config)
    else:
        components, usage = components_section(config, count_parameters(model_dir)), usage_section(repo_id)
    body = f"""
# {name}

MM-Phi: a small multimodal chat model (image + speech + text in, text out). A CLIP vision tower (TinyCLIP at full
size) feeds a projector into Phi (Phi-2 at full size), laid out like transformers' Llava; speech is transcribed by
Whisper and joins the prompt as text. Load it with `trust_remote_code=True`; the remote code needs transformers
{REQUIRED_TRANSFORMERS}.

## Components

{components}
## Training

{run_section(run, state, adapter)}{summary_text}
The MM-Phi recipe (what the repository's scripts do at full size; a description of the method, not of these
weights):

{chr(10).join(stages)}

## Evaluation

{evaluation_section(evaluations)}
## Limitations

{limitations_section(config)}
## Usage

{usage}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").content.rstrip() + "\n"


# --- main --------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the MM-Phi folder to share")
    parser.add_argument("--repo_id", required=True, help="NAME or USER/NAME on the Hub")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--metrics", action="append", default=[], help="a scripts/evaluate_mmphi.py JSON (repeatable)")
    parser.add_argument("--training_summary", help=f"rows per stage (default: {TRAINING_SUMMARY} in the folder)")
    parser.add_argument("--license", default="mit")
    parser.add_argument("--base_model", action="append", default=[], help="card metadata (repeatable)")
    parser.add_argument("--commit_message", default="Upload MM-Phi")
    parser.add_argument("--token", help="default: the saved login or HF_TOKEN")
    parser.add_argument("--dry_run", action="store_true", help="write what would be uploaded to --output_dir")
    parser.add_argument("--output_dir", help="with --dry_run: where to write the files")
    args = parser.parse_args(argv)
    if args.dry_run and not args.output_dir:
        parser.error("--dry_run needs --output_dir")
    if args.output_dir and not args.dry_run:
        parser.error("--output_dir goes with --dry_run")
    return args


def read_summary(model_dir: str, path: str | None):
    path = path or os.path.join(model_dir, TRAINING_SUMMARY)
    return load_json(path) if os.path.isfile(path) else None


def push(args: argparse.Namespace, api: HfApi | None = None) -> list[str]:
    """Build the card, stage the files, then write them (dry run) or upload them. Returns the staged names."""
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"no such model folder: {args.model}")
    evaluations = find_evaluations(args.model, args.metrics)
    card = build_card(args.model, args.repo_id, evaluations, read_summary(args.model, args.training_summary),
                      args.license, args.base_model)
    if args.dry_run:
        if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
            raise ValueError(f"{args.output_dir} is not empty: give a new or empty folder for the dry run")
        staged = stage_upload(args.model, args.output_dir, card, args.metrics, [name for name, _ in evaluations])
        print(f"dry run: {len(staged)} files that would be uploaded to {args.repo_id} are in {args.output_dir}:")
        print("\n".join(f"  {name}" for name in staged))
        return staged
    api = api or HfApi(token=args.token)
    with tempfile.TemporaryDirectory() as staging:
        staged = stage_upload(args.model, staging, card, args.metrics, [name for name, _ in evaluations])
        url = api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=args.repo_id, folder_path=staging, repo_type="model",
                          commit_message=args.commit_message)
    print(f"uploaded {len(staged)} files to {url}")
    return staged


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    push(parse_args(argv))


if __name__ == "__main__":
    from mmphi.errors import run_command

    run_command(main)
