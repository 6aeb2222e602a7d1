"""The layout the project keeps (one room per job): thin scripts over the `mmphi` package, no import-path edits, one
stage skeleton that every stage runs through, one word per stage, module loggers, and model files that import nothing
of ours (they travel with the weights)."""

import ast
import dataclasses
import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FILES = ("configuration_mmphi.py", "modeling_mmphi.py", "processing_mmphi.py", "speech_mmphi.py")
STAGE_WORDS = ("pretrain", "clip", "projector", "instruct")
STAGES = tuple(f"mmphi.stages.{word}" for word in STAGE_WORDS)
# What only the skeleton (mmphi.training.Stage) does: train, save the final folder, record and push the run.
SKELETON_CALLS = {"train", "save_model", "save_pretrained", "save_mmphi", "record_run", "push_final",
                  "plot_trainer_state", "resolve_resume"}


def tracked_python_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO_ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [path for path in listed.stdout.split() if os.path.exists(os.path.join(REPO_ROOT, path))]


def read(path: str) -> str:
    with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def imported_modules(path: str) -> set[str]:
    with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_nothing_edits_sys_path():
    edit = re.compile(r"sys\.path\.(insert|append|extend)\(|sys\.path\s*(\+=|=[^=])")
    offenders = []
    for path in tracked_python_files():
        with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as handle:
            if edit.search(handle.read()):
                offenders.append(path)
    assert offenders == []


def test_scripts_are_thin_and_never_import_each_other():
    scripts = [p for p in tracked_python_files() if p.startswith("scripts/")]
    assert scripts
    script_names = {os.path.basename(p).removesuffix(".py") for p in scripts}
    for path in scripts:
        imports = imported_modules(path)
        assert imports and all(name.startswith("mmphi") for name in imports), (path, imports)
        assert not imports & script_names, path
        with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as handle:
            assert len(handle.read().splitlines()) < 15, f"{path} is not a thin command line"


def test_model_files_import_nothing_of_ours():
    for path in MODEL_FILES:
        assert not {name for name in imported_modules(path) if name.split(".")[0] == "mmphi"}, path


@pytest.mark.parametrize("word", STAGE_WORDS)
def test_every_stage_runs_through_the_one_skeleton(word):
    """A stage module supplies its arguments and `build_trainer`; its command line, parser and ending are the
    skeleton's, and its own code never trains, saves, records or pushes."""
    from mmphi.training import Stage

    name = f"mmphi.stages.{word}"
    stage = importlib.import_module(name)
    assert {"ModelArguments", "DataArguments", "parse_args", "build_trainer", "main", "STAGE"} <= set(vars(stage))
    assert list(inspect.signature(stage.build_trainer).parameters)[:2] == ["model_args", "data_args"]
    assert isinstance(stage.STAGE, Stage) and stage.STAGE.name == word
    assert stage.main == stage.STAGE.main and stage.parse_args == stage.STAGE.parse_args
    assert stage.STAGE.build_trainer is stage.build_trainer
    assert stage.STAGE.arguments[:2] == (stage.ModelArguments, stage.DataArguments)
    assert "validate_data" in {f.name for f in dataclasses.fields(stage.DataArguments)}
    path = name.replace(".", "/") + ".py"
    calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
             for node in ast.walk(ast.parse(read(path))) if isinstance(node, ast.Call)}
    assert not calls & SKELETON_CALLS, (path, calls & SKELETON_CALLS)


def test_one_word_per_stage_in_scripts_tests_and_loggers():
    """scripts/<word>.py and tests/stages/test_<word>.py for each stage; every module logs under its own name."""
    for word in STAGE_WORDS:
        assert os.path.isfile(os.path.join(REPO_ROOT, "scripts", f"{word}.py")), word
        assert os.path.isfile(os.path.join(REPO_ROOT, "tests", "stages", f"test_{word}.py")), word
    named = re.compile(r"^logger = logging\.getLogger\((?!__name__\))", re.MULTILINE)
    offenders = [path for path in tracked_python_files() if path.startswith(("mmphi/", "benchmarks/"))
                 and named.search(read(path))]
    assert offenders == []


def test_command_lines_run_from_anywhere_and_start_quietly(tmp_path):
    """The thin scripts and `python -m` reach the installed package, whatever the working directory, and `--help`
    prints nothing on stderr (no bitsandbytes kernel notice, no torchvision fallback warning)."""
    commands = {"chat": [sys.executable, os.path.join(REPO_ROOT, "scripts", "chat.py"), "--help"],
                "app": [sys.executable, os.path.join(REPO_ROOT, "scripts", "app.py"), "--help"],
                "instruct": [sys.executable, "-m", "mmphi.stages.instruct", "--help"]}
    for name, command in commands.items():
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert result.returncode == 0 and result.stderr == "", (name, result.stderr[-2000:])
    assert "--data_path" in result.stdout
