"""`make demo` runs each stage's command line in its own process's place: the module's `main(argv)`, in-process."""

import importlib
import inspect
import shlex

import pytest

from mmphi.demo import plan, python, run_module
from mmphi.recipes import tiny_flags


def test_every_demo_stage_is_a_module_main_that_takes_its_printed_arguments():
    for stage in plan("work", "data"):
        if stage.command[0] == "copy":
            continue
        assert stage.command[1] == "-m", stage.name
        main = importlib.import_module(stage.command[2]).main
        assert list(inspect.signature(main).parameters) == ["argv"], stage.name


def test_run_module_runs_the_command_line_in_process(capsys):
    run_module(python("recipes", "instruct"))
    assert capsys.readouterr().out.strip() == shlex.join(tiny_flags("instruct"))


def test_a_failing_stage_stops_the_demo_with_its_exit_code(capsys):
    with pytest.raises(SystemExit) as failure:
        run_module(python("recipes", "no-such-stage"))
    assert failure.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
