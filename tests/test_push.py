"""push_to_hub.py offline: the dry-run folder is exactly what would be uploaded, loads through the Auto classes in a
fresh process without this repository, and its model card carries scripts/evaluate_mmphi.py's scores."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from mmphi import hub as push_to_hub
from mmphi.build import build_tiny, save_mmphi
from mmphi.data import synthetic as make_synthetic_data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = [{"stage": "1 projector", "steps": 40, "time_s": 12.5, "final_loss": 2.3456},
           {"stage": "2 qlora", "steps": 60, "time_s": 30.25, "final_loss": 0.4321}]


def read_bytes(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def run_evaluate_vqa(model_dir: str, data: dict, output_file: str) -> dict:
    """mmphi.evaluation (scripts/evaluate_mmphi.py) for real, in-process."""
    from mmphi.evaluation import main

    return main(["--task", "vqa", "--model_name_or_path", model_dir, "--data_path", data["llava_val"],
                        "--image_folder", data["images"], "--output_file", output_file,
                        "--max_samples", "4", "--max_new_tokens", "3"])


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """A model folder as the pipeline leaves it: weights, code, an evaluation JSON, a training summary, and things
    that must not be uploaded (a checkpoint folder, pickled training state)."""
    root = tmp_path_factory.mktemp("push")
    model, processor = build_tiny(seed=0)
    folder = root / "model"
    save_mmphi(model, processor, str(folder))
    data = make_synthetic_data.generate(str(root / "synthetic"), num_images=6, val_fraction=0.5)
    scores = run_evaluate_vqa(str(folder), data, str(folder / "vqa_eval.json"))
    os.remove(folder / "speech_mmphi.py")  # as a plain save_pretrained leaves it: the push must add it back
    (folder / "training_summary.json").write_text(json.dumps(SUMMARY))
    (folder / "checkpoint-5").mkdir()
    shutil.copy(folder / "model.safetensors", folder / "checkpoint-5" / "model.safetensors")
    (folder / "training_args.bin").write_bytes(b"pickled")
    (folder / "optimizer.pt").write_bytes(b"pickled")
    # what a user keeps beside a model, none of it for the Hub; links could point anywhere
    for name in ("token.txt", "secrets.json", ".credentials.json", "notes.md", "helper.py", "train.log"):
        (folder / name).write_text('{"token": "hf_secret"}')
    os.symlink("/etc/passwd", folder / "passwd.json")
    os.symlink(folder / "vqa_eval.json", folder / "linked_eval.json")
    return dict(root=root, folder=str(folder), model=model.eval(), processor=processor, scores=scores)


@pytest.fixture(scope="module")
def dry_run(trained_folder):
    output_dir = str(trained_folder["root"] / "upload")
    push_to_hub.main(["--model", trained_folder["folder"], "--repo_id", "someone/mmphi-tiny", "--dry_run",
                      "--output_dir", output_dir])
    return output_dir


def test_dry_run_writes_exactly_the_model_files(trained_folder, dry_run):
    """An allow-list: the model, processor and code files, the run's record and evaluations; never notes, secrets,
    logs, dotfiles, pickles, sub-folders or links."""
    staged = sorted(os.listdir(dry_run))
    assert staged == sorted([
        "README.md", "chat_template.jinja", "config.json", "configuration_mmphi.py", "generation_config.json",
        "model.safetensors", "modeling_mmphi.py", "processing_mmphi.py", "processor_config.json", "speech_mmphi.py",
        "tokenizer.json", "tokenizer_config.json", "training_summary.json", "vqa_eval.json",
    ])
    speech = "speech_mmphi.py"
    assert read_bytes(os.path.join(dry_run, speech)) == read_bytes(os.path.join(REPO_ROOT, speech))


def test_model_card_metadata_components_stages_and_metrics(trained_folder, dry_run):
    card = ModelCard.load(os.path.join(dry_run, "README.md"))
    assert card.data.license == "mit" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-text-to-text" and "mmphi" in card.data.tags
    text = card.text
    scores = trained_folder["scores"]
    assert f"| accuracy | {push_to_hub.format_number(scores['accuracy'])} |" in text
    assert f"| questions | {scores['questions']} |" in text
    for question_type, result in scores["per_type"].items():
        assert f"| per_type.{question_type}.questions | {result['questions']} |" in text
    assert "`llava_instruct_val.json`" in text and "`vqa_eval.json`" in text
    assert "| 2 qlora | 60 | 30.25 | 0.4321 |" in text  # the training summary
    assert "COCO 2017 captions" in text and "LLaVA-Instruct-150K" in text  # the recipe, described as such
    assert "not of these\nweights" in text and "claims no training for these weights" in text  # no run record
    assert "transformers\n>=5.23,<6" in text and "## Limitations" in text
    assert card.data.eval_results is None  # scored on a local file: no model-index entry
    assert "`llava_instruct_val.json` (a local file)" in text
    assert "\n\nThis run:\n\n| stage |" in text  # a paragraph of its own, not a row of the table before it
    total = sum(p.numel() for p in trained_folder["model"].parameters())
    assert f"**{push_to_hub.human_count(total)}**" in text  # counted from the safetensors header, no loading
    assert 'AutoModelForCausalLM.from_pretrained("someone/mmphi-tiny", trust_remote_code=True' in text


FRESH_PROCESS = textwrap.dedent("""
    import importlib.machinery, json, sys
    REPO_MODULES = ("configuration_mmphi", "modeling_mmphi", "processing_mmphi", "speech_mmphi")

    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

    folder, image_path, repo_root = sys.argv[1], sys.argv[2], sys.argv[3]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    backbone = AutoModel.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=Image.open(image_path))
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    print(json.dumps({"classes": [type(o).__module__ + "." + type(o).__name__ for o in (config, backbone, model,
                      processor)], "ids": ids.tolist(),
                      # the repo's own model files must be neither reachable from the search path nor imported: the
                      # folder's code is what ran
                      "repo_on_path": importlib.machinery.PathFinder.find_spec("modeling_mmphi") is not None,
                      "repo_modules_imported": [name for name in REPO_MODULES if name in sys.modules]}))
""")


def test_dry_run_loads_through_auto_classes_in_a_fresh_process(trained_folder, dry_run, tmp_path):
    image_path = tmp_path / "red.png"
    Image.new("RGB", (200, 160), (220, 20, 20)).save(image_path)
    script = tmp_path / "load_pushed.py"
    script.write_text(FRESH_PROCESS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TRANSFORMERS_VERBOSITY="error")
    command = [sys.executable, str(script), dry_run, str(image_path), REPO_ROOT]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert not loaded["repo_on_path"] and loaded["repo_modules_imported"] == []
    assert all(name.startswith("transformers_modules.") for name in loaded["classes"]), loaded["classes"]
    assert [name.rsplit(".", 1)[1] for name in loaded["classes"]] == [
        "MMPhiConfig", "MMPhiModel", "MMPhiForCausalLM", "MMPhiProcessor"
    ]
    model, processor = trained_folder["model"], trained_folder["processor"]
    prompt = "User: <image>\nWhat colour?\nAssistant:"
    inputs = processor(text=prompt, images=Image.open(image_path))
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert loaded["ids"] == expected.tolist()


def card_snippet(card_text: str) -> str:
    """The first Python block of the card's Usage section, as a reader would copy it."""
    usage = card_text.split("## Usage", 1)[1]
    return usage.split("```python\n", 1)[1].split("```", 1)[0]


def run_snippet(snippet: str, tmp_path) -> subprocess.CompletedProcess:
    """A card's snippet in a fresh process without this repository (the hub offline, as for a downloaded repo)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TRANSFORMERS_VERBOSITY="error")
    return subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)


def test_the_cards_usage_snippet_runs_as_written(trained_folder, dry_run, tmp_path):
    """The generated card's snippet, with only the repo id (a downloaded copy) and the photo filled in, answers as
    `model.generate` does in this process."""
    Image.new("RGB", (200, 160), (220, 20, 20)).save(tmp_path / "photo.jpg")
    snippet = card_snippet(ModelCard.load(os.path.join(dry_run, "README.md")).text)
    assert snippet.count('"someone/mmphi-tiny"') == 2
    result = run_snippet(snippet.replace('"someone/mmphi-tiny"', repr(dry_run)), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    model, processor = trained_folder["model"], trained_folder["processor"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       images=Image.open(tmp_path / "photo.jpg"))
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=64)
    expected = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert result.stdout.rstrip("\n") == expected


def test_real_upload_sends_the_dry_run_files(trained_folder, dry_run):
    """The upload path stages the same files and hands them to HfApi.create_repo + upload_folder (a recording
    stand-in for the Hub, which is not reachable here)."""

    class RecordingApi:
        calls = []

        def create_repo(self, repo_id, **kwargs):
            self.calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, **kwargs):
            files = {name: read_bytes(os.path.join(folder_path, name)) for name in os.listdir(folder_path)}
            self.calls.append(("upload_folder", repo_id, files))

    api = RecordingApi()
    args = push_to_hub.parse_args(["--model", trained_folder["folder"], "--repo_id", "someone/mmphi-tiny",
                                   "--private"])
    push_to_hub.push(args, api=api)
    (_, repo_id, create_kwargs), (_, upload_repo, files) = api.calls
    assert repo_id == upload_repo == "someone/mmphi-tiny"
    assert create_kwargs["private"] is True and create_kwargs["exist_ok"] is True
    assert sorted(files) == sorted(os.listdir(dry_run))
    for name, content in files.items():
        assert content == read_bytes(os.path.join(dry_run, name)), name


def test_bad_folders_and_flags_are_clear_errors(trained_folder, tmp_path):
    folder = trained_folder["folder"]

    def push(*extra):
        return push_to_hub.push(push_to_hub.parse_args(["--model", *extra[:1], "--repo_id", "x/y", *extra[1:]]))

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="an adapter without adapter_model.safetensors"):
        push(str(adapter), "--dry_run", "--output_dir", str(tmp_path / "a"))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="an adapter without its processor"):
        push(str(adapter), "--dry_run", "--output_dir", str(tmp_path / "a"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"pickled")
    with pytest.raises(ValueError, match="no safetensors weights .*pytorch_model.bin"):
        push(str(pickled), "--dry_run", "--output_dir", str(tmp_path / "b"))
    not_scores = tmp_path / "scores.json"
    not_scores.write_text(json.dumps({"accuracy": 1.0}))
    with pytest.raises(ValueError, match="not a scripts/evaluate_mmphi.py output"):
        push(folder, "--metrics", str(not_scores), "--dry_run", "--output_dir", str(tmp_path / "c"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        push(folder, "--dry_run", "--output_dir", str(tmp_path / "d"))
    with pytest.raises(SystemExit):
        push_to_hub.parse_args(["--model", folder, "--repo_id", "x/y", "--dry_run"])


def test_metrics_flag_adds_an_outside_evaluation(trained_folder, tmp_path):
    caption_scores = {"task": "caption", "data": ["captions_val.json"], "bleu4": 0.1234, "cider": 0.5678}
    metrics = tmp_path / "caption_eval.json"
    metrics.write_text(json.dumps(caption_scores))
    output_dir = tmp_path / "upload"
    staged = push_to_hub.push(push_to_hub.parse_args(
        ["--model", trained_folder["folder"], "--repo_id", "x/y", "--metrics", str(metrics), "--dry_run",
         "--output_dir", str(output_dir)]))
    assert "caption_eval.json" in staged and "vqa_eval.json" in staged
    text = (output_dir / "README.md").read_text()
    assert "| bleu4 | 0.1234 |" in text and "| cider | 0.5678 |" in text and "**caption**" in text


def test_model_index_names_hub_datasets_only():
    """A score on a Hub dataset is a model-index entry; one on a local file (the demo's synthetic shapes) is not."""
    evaluations = [("vqa_eval.json", {"task": "vqa", "data": ["data/synthetic/llava_instruct_val.json"],
                                      "accuracy": 0.9, "scoring": "exact match against the record's one answer"}),
                   ("vqav2_eval.json", {"task": "vqa", "data": "lmms-lab/VQAv2", "accuracy": 0.5})]
    index = push_to_hub.model_index(evaluations)
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in index] == [("lmms-lab/VQAv2", "accuracy", 0.5)]
    section = push_to_hub.evaluation_section(evaluations)
    assert "`llava_instruct_val.json` (a local file)" in section and "`lmms-lab/VQAv2`" in section
    assert "Scoring: exact match against the record's one answer." in section


def test_table_cells_escape_pipes_and_keep_one_line():
    assert push_to_hub.table_cell("a|b\nc") == "a\\|b c"
    assert push_to_hub.table_cell(["x|y"]) == '["x\\|y"]' and push_to_hub.table_cell(0.123456) == "0.1235"
    assert push_to_hub.describe_target_modules(["v_proj", "q_proj"]) == "q_proj, v_proj"
    assert push_to_hub.describe_target_modules(r".*\.(q|v)_proj") == r"the modules matching `.*\.(q|v)_proj`"
