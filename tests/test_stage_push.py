"""`--push_to_hub` in the stages: the final usable folder (a full model, or an adapter with its processor) is pushed
once with a card built from the run, never the feature cache or sub-folders. The Hub is not reachable here: a
recording stand-in for `HfApi` receives the upload."""

import json
import math
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from test_push import card_snippet, run_snippet

from mmphi import hub
from mmphi.build import build_tiny, save_mmphi
from mmphi.data.synthetic import generate
from mmphi.stages import instruct, projector


class RecordingApi:
    uploads: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = {path.name: path.read_bytes() for path in Path(folder_path).iterdir()}
        RecordingApi.uploads.append((repo_id, files, kwargs))


@pytest.fixture
def recorded(monkeypatch):
    RecordingApi.uploads = []
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", "")  # a stage given --hub_token sets it: undone after the test
    return RecordingApi.uploads


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_push")
    save_mmphi(*build_tiny(seed=0), str(root / "base"))
    return root, generate(str(root / "data"), num_images=8, val_fraction=0.25, seed=4)


def card_of(files) -> ModelCard:
    return ModelCard(files["README.md"].decode())


def test_projector_pushes_its_model_folder_with_the_runs_numbers_and_no_cached_features(setup, recorded, tmp_path):
    root, data = setup
    out = tmp_path / "projector"
    metrics = projector.main([
        "--model_name_or_path", str(root / "base"), "--data_path", data["captions_train"], "--image_folder",
        data["images"], "--eval_data_path", data["captions_val"], "--eval_image_folder", data["images"],
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "1", "--optim", "adamw_torch", "--save_strategy", "steps", "--save_steps",
        "1", "--logging_steps", "1", "--cache_vision_features", "--push_to_hub", "--hub_model_id",
        "someone/mmphi-projector", "--hub_private_repo", "true", "--hub_token", "hf_not_in_any_file"])
    (repo_id, files, kwargs), = recorded  # exactly one push, at the end
    assert repo_id == "someone/mmphi-projector"
    assert {"model.safetensors", "config.json", "processor_config.json", "modeling_mmphi.py", "run_info.json",
            "trainer_state.json", "README.md"} <= set(files)
    assert not any("checkpoint" in name or "vision_features" in name for name in files)
    assert (out / "checkpoint-1").is_dir()  # saved locally, not pushed
    pickled = [path for path in out.rglob("*") if path.is_file() and b"hf_not_in_any_file" in path.read_bytes()]
    assert pickled == []  # the token reaches the push (HF_TOKEN), never training_args.bin

    card = card_of(files)
    state = json.loads(files["trainer_state.json"])
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert "| stage | projector |" in card.text and "| steps | 2 |" in card.text
    assert f"| final training loss (last logged) | {hub.format_number(losses[-1])} |" in card.text
    assert f"| final evaluation loss | {hub.format_number(metrics['eval_loss'])} |" in card.text
    assert f"| data: data_path | {data['captions_train']} |" in card.text
    assert card.data.base_model is None and card.data.datasets is None  # local paths are not hub metadata
    assert math.isfinite(metrics["train_loss"])


INSTRUCT_FLAGS = ["--load_in_4bit", "false", "--lora_r", "4", "--max_steps", "2", "--per_device_train_batch_size",
                  "2", "--gradient_accumulation_steps", "1", "--optim", "adamw_torch", "--warmup_steps", "0",
                  "--val_fraction", "0", "--save_strategy", "no", "--logging_steps", "1", "--push_to_hub"]


def test_instruct_pushes_the_adapter_with_its_processor(setup, recorded, tmp_path):
    root, data = setup
    instruct.main(["--model_name_or_path", str(root / "base"), "--data_path", data["llava_train"], "--image_folder",
                   data["images"], "--output_dir", str(tmp_path / "adapter-run"), *INSTRUCT_FLAGS])
    (repo_id, files, _), = recorded
    assert repo_id == "adapter-run"  # default: the output folder's name
    assert {"adapter_model.safetensors", "adapter_config.json", "processor_config.json", "processing_mmphi.py",
            "speech_mmphi.py", "run_info.json", "README.md"} <= set(files)
    card = card_of(files)
    assert card.data.library_name == "peft"
    assert "| LoRA r | 4 |" in card.text and "PeftModel.from_pretrained" in card.text
    # the regex target_modules read as one pattern, its `|` escaped in the table; the local base as a placeholder
    pattern = json.loads(files["adapter_config.json"])["target_modules"]
    assert isinstance(pattern, str) and "|" in pattern
    assert f"the modules matching `{pattern}`" in card.text
    assert f"| LoRA target_modules | {pattern.replace('|', chr(92) + '|')} |" in card.text
    usage = card.text.split("## Usage")[1]
    assert str(root) not in usage and 'from_pretrained("BASE_REPO"' in usage
    assert "local base folder (`base`)" in card.text

    # the snippet as a reader runs it: BASE_REPO and the repo id filled in with downloaded copies
    pushed = tmp_path / "pushed-adapter"
    pushed.mkdir()
    for name, content in files.items():
        (pushed / name).write_bytes(content)
    snippet = card_snippet(card.text).replace('"BASE_REPO"', repr(str(root / "base")))
    snippet = snippet.replace('"adapter-run"', repr(str(pushed)))
    snippet += "print(type(model).__name__, type(processor).__name__, model.peft_config['default'].r)\n"
    result = run_snippet(snippet, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["PeftModelForCausalLM", "MMPhiProcessor", "4"]


def test_instruct_with_merge_pushes_the_merged_model(setup, recorded, tmp_path):
    root, data = setup
    out = tmp_path / "merge-run"
    instruct.main(["--model_name_or_path", str(root / "base"), "--data_path", data["llava_train"], "--image_folder",
                   data["images"], "--output_dir", str(out), "--merge", "--merge_into", "original",
                   "--hub_model_id", "someone/merged", *INSTRUCT_FLAGS])
    (repo_id, files, _), = recorded
    assert repo_id == "someone/merged"
    assert {"model.safetensors", "config.json", "run_info.json", "trainer_state.json"} <= set(files)
    assert "adapter_model.safetensors" not in files and not any(name.startswith("merged") for name in files)
    run = json.loads(files["run_info.json"])
    assert run["merged"] is True and run["lora"]["lora_r"] == 4
    assert "| merged | LoRA folded into the original weights |" in card_of(files).text


def test_pretrain_pushes_the_language_model_as_one_part_of_mmphi(recorded, tmp_path):
    from mmphi import TINY_TOKENIZER
    from mmphi.stages import pretrain

    words = ["the", "ship", "sailed", "north", "across", "cold", "water", "while", "the", "captain", "watched",
             "the", "sky"]
    corpus = tmp_path / "cc.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(words[i:] + words[:i]) * 3}) + "\n" for i in range(40)))
    pretrain.main(["--config_name", "tiny", "--config_overrides", "hidden_size=32,intermediate_size=64,"
                   "num_hidden_layers=2,num_attention_heads=4", "--tokenizer_name", TINY_TOKENIZER, "--train_files",
                   str(corpus), "--output_dir", str(tmp_path / "pretrain"), "--block_size", "32",
                   "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--max_steps", "2",
                   "--optim", "adamw_torch", "--save_strategy", "no", "--validation_split_percentage", "10",
                   "--push_to_hub"])
    (repo_id, files, _), = recorded
    assert repo_id == "pretrain" and {"model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    card = card_of(files)
    assert "One part of MM-Phi, not the multimodal model: a `phi` model" in card.text
    assert "| stage | pretrain |" in card.text and "| started from | random initialisation |" in card.text
