"""The layout the project keeps (one room per job): thin scripts over the `mmphi` package, no import-path edits, one
stage contract, and model files that import nothing of ours (they travel with the weights)."""

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FILES = ("configuration_mmphi.py", "modeling_mmphi.py", "processing_mmphi.py", "speech_mmphi.py")
STAGES = ("mmphi.stages.pretrain", "mmphi.stages.clip", "mmphi.stages.projector", "mmphi.stages.instruct")


def tracked_python_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO_ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [path for path in listed.stdout.split() if os.path.exists(os.path.join(REPO_ROOT, path))]


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
    scripts = [p for p in tracked_python_files() if p.startswith(("scripts/", "benchmarks/"))]
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


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_exposes_the_same_contract(name):
    stage = importlib.import_module(name)
    assert {"ModelArguments", "DataArguments", "parse_args", "build_trainer", "main"} <= set(vars(stage))
    assert list(inspect.signature(stage.build_trainer).parameters)[:2] == ["model_args", "data_args"]


def test_stage_command_lines_run_from_anywhere(tmp_path):
    """The thin scripts and `python -m` reach the installed package, whatever the working directory."""
    for command in ([sys.executable, os.path.join(REPO_ROOT, "scripts", "train_projector.py"), "--help"],
                    [sys.executable, "-m", "mmphi.stages.instruct", "--help"]):
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "--data_path" in result.stdout, result.stderr[-2000:]
