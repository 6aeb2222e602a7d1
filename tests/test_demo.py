"""`make demo` runs each stage's printed command line in the demo's own process: the module's `main(argv)`."""

import importlib
import inspect
import json

import pytest

from mmphi.demo import plan, python, run_module, training_facts
from mmphi.recipes import recipe_path


def test_every_demo_stage_is_a_module_main_that_takes_its_printed_arguments():
    for stage in plan("work", "data"):
        if stage.command[0] == "copy":
            continue
        assert stage.command[1] == "-m", stage.name
        main = importlib.import_module(stage.command[2]).main
        assert list(inspect.signature(main).parameters) == ["argv"], stage.name


def test_every_training_stage_of_the_demo_reads_its_tiny_recipe_file():
    stages = {stage.command[2]: stage.command for stage in plan("work", "data") if stage.command[0] != "copy"}
    for word in ("pretrain", "clip", "projector", "instruct"):
        command = stages[f"mmphi.stages.{word}"]
        assert command[3:5] == ["--config", recipe_path("tiny", word)], word


def test_run_module_runs_the_command_line_in_process(capsys):
    run_module(python("build", "--help"))
    assert "--vision_model" in capsys.readouterr().out


def test_a_failing_stage_stops_the_demo_with_its_exit_code(capsys):
    with pytest.raises(SystemExit) as failure:
        run_module(python("build", "--no-such-flag"))
    assert failure.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_training_facts_read_the_stage_record_and_its_loss_curve(tmp_path):
    logged, silent = tmp_path / "logged", tmp_path / "silent"
    for run, history in ((logged, [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.5}]), (silent, [])):
        run.mkdir()
        (run / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": history}))
    (logged / "loss_curve.png").write_bytes(b"png")
    assert training_facts(str(logged)) == {"steps": 20, "final_loss": 1.5, "loss_curve": str(logged / "loss_curve.png")}
    assert training_facts(str(silent)) == {"steps": 20, "final_loss": None, "loss_curve": None}
