"""Bad input to the command lines: one line `prog: error: ...` that names the file and the fix, exit status 1, never
a traceback. Table-driven over a corpus of bad inputs the test builds; the commands run as scripts/*.py runs them
(`mmphi.errors.run_command`)."""

import errno
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from mmphi import build, chat, evaluation, export, hub, merge
from mmphi.build import build_tiny, save_mmphi
from mmphi.errors import describe_error, run_command
from mmphi.stages import pretrain, projector

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, draw_shape):
    """A good tiny model and image, and the bad inputs made from them."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model = root / "model"
    save_mmphi(*build_tiny(seed=0), str(model))
    draw_shape(root / "red.png", "red")

    truncated = root / "truncated"
    shutil.copytree(model, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])

    no_tokenizer = root / "no_tokenizer"
    shutil.copytree(model, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()

    adapter = root / "adapter"  # what instruct writes without --merge: adapter + processor, no config.json
    shutil.copytree(model, adapter, ignore=shutil.ignore_patterns(*MODEL_FILES))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))

    other_architecture = root / "bert"
    other_architecture.mkdir()
    (other_architecture / "config.json").write_text(json.dumps({"model_type": "bert"}))

    (root / "not_utf8.jsonl").write_bytes(b'\xff{"prompt": "hi"}\n')
    (root / "no_annotations.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "red.png"}],
                                                          "annotations": []}))
    (root / "notes").mkdir()
    (root / "notes" / "mine.txt").write_text("keep me")
    (root / "bad.parquet").write_text("not parquet")

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"root": root, "url": f"http://127.0.0.1:{server.server_address[1]}"}
    server.shutdown()


# (command, argv with {root} and {url} filled in, what the one line must say)
CASES = [
    ("chat.py", chat.main, ["--model", "./nope", "hi"], r"no such model folder: \./nope"),
    ("chat.py", chat.main, ["--model", "{root}/adapter", "hi"],
     r"{root}/adapter is not an MM-Phi folder \(no config.json\) \(it is a LoRA adapter: pass it as --adapter"),
    ("chat.py", chat.main, ["--model", "{root}/model", "--image", "/nope.png", "hi"],
     r"image file not found: /nope.png"),
    ("chat.py", chat.main, ["--model", "{root}/model", "--image", "{url}/missing.png", "hi"],
     r"cannot load image {url}/missing.png: .*404"),
    ("chat.py", chat.main, ["--model", "{root}/truncated", "hi"],
     r"{root}/truncated: cannot read its safetensors weights .*damaged or cut short"),
    ("chat.py", chat.main, ["--model", "{root}/no_tokenizer", "hi"],
     r"{root}/no_tokenizer has a processor but no tokenizer"),
    ("chat.py", chat.main, ["--model", "{root}/bert", "hi"], r"no processor_config.json in {root}/bert"),
    ("chat.py", chat.main, ["--model", "{root}/model", "--batch", "{root}/not_utf8.jsonl", "--output", "{root}/o"],
     r"{root}/not_utf8.jsonl, line 1: not valid UTF-8"),
    ("evaluate_mmphi.py", evaluation.main, ["--task", "vqa", "--model_name_or_path", "{root}/model", "--data_path",
                                            "{root}/nope.json"], r"--data_path {root}/nope.json: no such file"),
    ("merge_lora.py", merge.main, ["--model_name_or_path", "{root}/model", "--adapter", "{root}/adapter",
                                   "--output_dir", "{root}/notes"],
     r"{root}/notes exists and holds more than a model \(mine.txt\)"),
    ("projector.py", projector.main, ["--model_name_or_path", "{root}/model", "--data_path",
                                      "{root}/no_annotations.json", "--output_dir", "{root}/projector"],
     r"{root}/no_annotations.json: no samples in it \(a COCO file with no annotations"),
    ("export_llava.py", export.main, ["--model", "{root}/adapter", "--output_dir", "{root}/llava"],
     r"{root}/adapter is a LoRA adapter: merge it into its base first"),
    ("projector.py", projector.main, ["--model_name_or_path", "{root}/model", "--data_path", "{root}/notes",
                                      "--output_dir", "{root}/projector"],
     r"{root}/notes: a folder, not a file: give its files \({root}/notes/\*\.json\), or the folder as "
     r"--dataset_name {root}/notes"),
    ("pretrain.py", pretrain.main, ["--train_files", "{root}/notes", "--output_dir", "{root}/pretrain",
                                    "--config_name", "tiny"], r"{root}/notes: a folder, not a file"),
    ("chat.py", chat.main, ["--model", "{root}/model", "--adapter", "{root}/adapter", "hi"],
     r"{root}/adapter: no adapter_model.safetensors"),
    ("merge_lora.py", merge.main, ["--model_name_or_path", "{root}/model", "--adapter", "{root}/nope",
                                   "--output_dir", "{root}/merged"], r"no such adapter folder: {root}/nope"),
    ("push_to_hub.py", hub.main, ["--model", "/nope", "--repo_id", "someone/model", "--dry_run", "--output_dir",
                                  "{root}/staged"], r"no such model folder: /nope"),
    ("pretrain.py", pretrain.main, ["--train_files", "{root}/notes/mine.txt", "--tokenizer_name", "./nope",
                                    "--output_dir", "{root}/pretrain", "--config_name", "tiny"],
     r"no such model folder: \./nope"),
    ("projector.py", projector.main, ["--model_name_or_path", "{root}/model", "--data_path",
                                      "{root}/no_annotations.json", "--output_dir", "{root}/projector",
                                      "--resume_from_checkpoint", "{root}/nope"],
     r"--resume_from_checkpoint {root}/nope: no such checkpoint folder"),
    ("projector.py", projector.main, ["--model_name_or_path", "{root}/model", "--data_path",
                                      "{root}/bad.parquet", "--output_dir", "{root}/projector"],
     r"{root}/bad.parquet: cannot be read as parquet: Parquet magic bytes not found"),
    ("build_model.py", build.main, ["--vision_model", "/nope", "--text_model", "{root}/model", "--output_dir",
                                    "{root}/built"], r"no such model folder: /nope"),
]


@pytest.mark.parametrize(("prog", "main", "argv", "message"), CASES, ids=[f"{c[0]}:{i}" for i, c in enumerate(CASES)])
def test_a_bad_input_is_one_line_naming_it(corpus, prog, main, argv, message, monkeypatch, capsys):
    import re

    fill = {"root": str(corpus["root"]), "url": corpus["url"]}
    monkeypatch.setattr(sys, "argv", [prog])
    monkeypatch.delenv("MMPHI_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_command(functools.partial(main, [a.format(**fill) for a in argv]))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(f"{prog}: error: .*{message.format(**{k: re.escape(v) for k, v in fill.items()})}.*", err), err
    assert (corpus["root"] / "notes" / "mine.txt").read_text() == "keep me"


def test_a_full_disk_and_ctrl_c_are_said_in_words(monkeypatch, capsys):
    error = OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors")
    assert describe_error(error) == ("the disk is full (writing /out/model.safetensors): free space or choose "
                                     "another output folder")
    monkeypatch.setattr(sys, "argv", ["instruct.py"])

    def interrupted():
        raise KeyboardInterrupt("at step 7: saved out/checkpoint-7; continue with --resume_from_checkpoint latest")

    with pytest.raises(SystemExit) as exit_info:
        run_command(interrupted)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == ("instruct.py: interrupted: at step 7: saved out/checkpoint-7; continue "
                                               "with --resume_from_checkpoint latest")
    monkeypatch.setenv("MMPHI_TRACEBACK", "1")

    def bug():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):  # the traceback, for a bug report
        run_command(bug)


def test_the_scripts_print_one_line_and_exit_1(tmp_path):
    """scripts/chat.py itself, in a fresh process: the one line on stderr, nothing else."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "chat.py"), "--model", "./nope", "hi"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip() == "chat.py: error: no such model folder: ./nope"
