"""`make demo` runs each stage's printed command line in the demo's own process: the module's `main(argv)`."""

import importlib
import inspect
import json
import shlex

import pytest

from mmphi.demo import plan, python, run_module, training_facts
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


def test_training_facts_draw_the_loss_curve_and_survive_a_run_without_one(tmp_path, capsys):
    logged, silent = tmp_path / "logged", tmp_path / "silent"
    for run, history in ((logged, [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.5}]), (silent, [])):
        run.mkdir()
        (run / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": history}))
    assert training_facts(str(logged)) == {"steps": 20, "final_loss": 1.5, "loss_curve": str(logged / "loss_curve.png")}
    assert (logged / "loss_curve.png").stat().st_size > 1000
    assert training_facts(str(silent)) == {"steps": 20, "final_loss": None, "loss_curve": None}
    assert "no loss curve" in capsys.readouterr().err
