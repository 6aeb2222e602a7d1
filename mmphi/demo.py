"""`make demo`: the seed's whole pipeline at tiny scale, offline, on CPU.

    prepare corpus -> pretrain (a tiny Phi) -> synthetic data -> clip (a tiny CLIP, contrastive on the synthetic
    captions: the offline stand-in for TinyCLIP) -> build MM-Phi (that CLIP's tower + that Phi) -> projector
    (+ the tiny Phi; tower frozen) -> instruct (QLoRA) -> merge -> evaluate (held-out VQA)
    -> a question about an image asked by voice (flite-synthesized WAV -> Whisper tiny.en -> transcript -> answer)

Each stage is the stage's own command line (`python -m mmphi.stages.<stage>`, the same `main` as scripts/) with its
tiny recipe (`--config recipes/tiny/<stage>.yaml`): printed, then run in this process (its `main(argv)`), which
spares each stage the ~10 s of importing torch, transformers, PEFT and TRL anew. Every stage seeds its own
randomness, so it computes what its printed command computes. A finished stage is reused on a re-run unless FORCE=1
(or --force). Each training stage writes a loss-curve PNG; a summary table ends the run and is saved as
`training_summary.json` (with the evaluation JSON) in the final model folder, where push_to_hub.py's model card picks
both up.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

from mmphi.recipes import recipe_args

VOICE_QUESTION = "What colour are the shapes?"


@dataclass
class Step:
    name: str
    done_marker: str  # a file that exists only when the stage finished
    command: list[str]  # python(...): [sys.executable, "-m", "mmphi.<module>", *args]; or ["copy", source, dest]
    run_dir: str | None = None  # where trainer_state.json lands (training stages)
    result: dict = field(default_factory=dict)


def python(module: str, *args: str) -> list[str]:
    """An `mmphi` module's command line (what the demo prints, and runs in-process with `run_module`)."""
    return [sys.executable, "-m", f"mmphi.{module}", *args]


def run_module(command: list[str]) -> None:
    """Run a `python(...)` command line in this process: the module's `main(argv)`."""
    module = command[2]
    try:
        importlib.import_module(module).main(command[3:])
    except SystemExit as exit_:  # argparse errors and --validate_data exit; a clean exit (0/None) is success
        if exit_.code not in (None, 0):
            raise
    finally:
        gc.collect()  # the stage's model and data go before the next stage loads its own


def plan(work: str, data: str, generator: str = "synthetic") -> list[Step]:
    """The stages; `generator` names the shapes generator module (`synthetic`, or `synthetic_variant` to try the
    unchanged recipe on data it was not tuned on)."""
    corpus, synthetic = os.path.join(data, "corpus"), os.path.join(data, "synthetic")
    pretrain, clip, base = os.path.join(work, "pretrain"), os.path.join(work, "clip"), os.path.join(work, "mmphi-base")
    projector, instruct = os.path.join(work, "projector"), os.path.join(work, "instruct")
    features = os.path.join(work, "vision_features")
    final, evaluation = os.path.join(work, "mmphi-final"), os.path.join(work, "eval_vqa.json")
    images = os.path.join(synthetic, "images")
    return [
        Step("corpus", os.path.join(corpus, "c4.jsonl"), python("data.npm_corpus", "--output_dir", corpus)),
        Step(
            "pretrain: a tiny Phi",
            os.path.join(pretrain, "model.safetensors"),
            python(
                "stages.pretrain", *recipe_args("tiny", "pretrain"),
                "--train_files", os.path.join(corpus, "cc.jsonl"), os.path.join(corpus, "c4.jsonl"),
                "--output_dir", pretrain, "--disable_tqdm", "false",
            ),
            run_dir=pretrain,
        ),
        Step(
            "synthetic data",
            os.path.join(synthetic, "llava_instruct_val.json"),
            python(f"data.{generator}", "--output_dir", synthetic),
        ),
        Step(
            "clip: a tiny CLIP (stand-in for TinyCLIP)",
            os.path.join(clip, "model.safetensors"),
            python(
                "stages.clip", *recipe_args("tiny", "clip"), "--data_path",
                os.path.join(synthetic, "captions_train.json"), "--image_folder", images, "--output_dir", clip,
            ),
            run_dir=clip,
        ),
        Step(
            "build MM-Phi (tiny CLIP tower + tiny Phi)",
            os.path.join(base, "model.safetensors"),
            # full: keep CLS, where CLIP's contrastive loss put what the tiny tower learned
            python("build", "--vision_model", clip, "--text_model", pretrain,
                   "--vision_feature_select_strategy", "full", "--output_dir", base),
        ),
        Step(
            "projector (+ tiny Phi)",
            os.path.join(projector, "model.safetensors"),
            python(
                "stages.projector", *recipe_args("tiny", "projector"), "--model_name_or_path", base,
                "--data_path", os.path.join(synthetic, "captions_train.json"), "--image_folder", images,
                "--output_dir", projector, "--feature_cache_dir", features,
            ),
            run_dir=projector,
        ),
        Step(
            "instruct: QLoRA + merge",
            os.path.join(instruct, "merged", "model.safetensors"),
            python(
                "stages.instruct", *recipe_args("tiny", "instruct"), "--model_name_or_path", projector,
                "--data_path", os.path.join(synthetic, "llava_instruct_train.json"), "--image_folder", images,
                "--output_dir", instruct, "--feature_cache_dir", features, "--merge",
            ),
            run_dir=instruct,
        ),
        Step(
            "evaluate: held-out VQA",
            evaluation,
            python(
                "evaluation", "--task", "vqa", "--model_name_or_path", os.path.join(instruct, "merged"),
                "--data_path", os.path.join(synthetic, "llava_instruct_val.json"), "--image_folder", images,
                "--output_file", evaluation,
                # the demo's own folder (an earlier checkout's code, when reused): no question to ask
                "--trust_remote_code",
            ),
        ),
        Step("final model folder", os.path.join(final, "model.safetensors"), ["copy", os.path.join(instruct, "merged"),
              final]),
    ]


def run_stage(stage: Step, force: bool) -> None:
    if os.path.exists(stage.done_marker) and not force:
        stage.result["status"] = "reused"
        print(f"\n=== {stage.name}: reused ({stage.done_marker} exists; FORCE=1 to redo)", flush=True)
        return
    print(f"\n=== {stage.name}\n$ {shlex.join(stage.command)}", flush=True)
    start = time.time()
    if stage.command[0] == "copy":
        shutil.copytree(stage.command[1], stage.command[2], dirs_exist_ok=True)
    else:
        try:
            run_module(stage.command)
        except (Exception, SystemExit):  # not KeyboardInterrupt: a stopped run did not fail
            print(f"\ndemo: stage '{stage.name}' failed; its command line is above", file=sys.stderr, flush=True)
            raise
    stage.result.update(status="ran", time_s=round(time.time() - start, 1))


def training_facts(run_dir: str) -> dict:
    """Steps and final training loss from trainer_state.json, and the stage's loss-curve PNG."""
    state_path = os.path.join(run_dir, "trainer_state.json")
    if not os.path.exists(state_path):
        return {}
    with open(state_path) as handle:
        state = json.load(handle)
    losses = [entry["loss"] for entry in state.get("log_history", []) if "loss" in entry]
    plot = os.path.join(run_dir, "loss_curve.png")
    return {
        "steps": state.get("global_step"),
        "final_loss": round(losses[-1], 4) if losses else None,
        "loss_curve": plot if os.path.exists(plot) else None,
    }


def synthesize_question(path: str, text: str) -> str:
    """A spoken question: flite's "slt" voice (Whisper tiny.en transcribes it exactly; flite's default "kal" voice
    came out as "while parallel out of the shape."), espeak-ng as a fallback."""
    if shutil.which("flite"):
        subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", path], check=True)
    elif shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", path, text], check=True)
    else:
        raise SystemExit("demo: needs flite or espeak-ng to synthesize the voice question (apt-get install flite)")
    return path


def held_out_image(synthetic: str) -> tuple[str, str]:
    """An image of the held-out split and its true colour (from the generator's ground truth)."""
    with open(os.path.join(synthetic, "llava_instruct_val.json")) as handle:
        records = json.load(handle)
    for record in records:
        for question, answer in zip(record["conversations"][::2], record["conversations"][1::2], strict=False):
            if record.get("image") and question.get("question_type") == "colour":
                return os.path.join(synthetic, "images", record["image"]), answer["value"]
    raise SystemExit("demo: no held-out colour question found")


def ask_by_voice(work: str, data: str, final: str) -> None:
    wav = synthesize_question(os.path.join(work, "question.wav"), VOICE_QUESTION)
    image, truth = held_out_image(os.path.join(data, "synthetic"))
    print(f"\n=== voice question about a held-out image\nimage: {image} (ground truth colour: {truth})\n"
          f"audio: {wav} (flite saying {VOICE_QUESTION!r})", flush=True)
    run_module(python("chat", "--model", final, "--image", image, "--audio", wav, "--max_new_tokens", "8"))


def summarize(stages: list[Step], evaluation_path: str) -> list[dict]:
    with open(evaluation_path) as handle:
        evaluation = json.load(handle)
    rows = []
    for stage in stages:
        row = {"stage": stage.name, "status": stage.result.get("status"), "time_s": stage.result.get("time_s")}
        if stage.run_dir:
            row.update(training_facts(stage.run_dir))
        if stage.name.startswith("evaluate"):
            row["accuracy"] = evaluation.get("accuracy")
        rows.append(row)
    print("\n=== summary")
    print(f"{'stage':42} {'status':7} {'steps':>6} {'time s':>8} {'final loss':>11} {'accuracy':>9}")
    for row in rows:
        cells = [row.get("steps"), row.get("time_s"), row.get("final_loss"), row.get("accuracy")]
        steps, seconds, loss, accuracy = ("" if value is None else value for value in cells)
        accuracy = f"{accuracy:.1%}" if isinstance(accuracy, float) else accuracy
        print(f"{row['stage']:42} {row['status'] or '':7} {steps!s:>6} {seconds!s:>8} {loss!s:>11} {accuracy:>9}")
    per_type = evaluation.get("per_type", {})
    print("held-out VQA accuracy by question type (mmphi.evaluation): " + ", ".join(
        f"{name} {scores['accuracy']:.1%} (n={scores['questions']})" for name, scores in sorted(per_type.items())
    ))
    for row in rows:
        if row.get("loss_curve"):
            print(f"loss curve: {row['loss_curve']}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=os.path.join("outputs", "demo"))
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--force", action="store_true", default=os.environ.get("FORCE") == "1")
    parser.add_argument("--generator", choices=["synthetic", "synthetic_variant"], default="synthetic",
                        help="the shapes data: ours, or the variant the recipe was not tuned on")
    args = parser.parse_args(argv)
    # Offline by design; set before the first stage imports huggingface_hub, which reads it once.
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    os.makedirs(args.work_dir, exist_ok=True)
    start = time.time()
    stages = plan(args.work_dir, args.data_dir, args.generator)
    force = args.force
    for stage in stages:
        run_stage(stage, force)
        force = force or stage.result["status"] == "ran"  # a redone stage invalidates everything after it
    final = stages[-1].command[2]
    evaluation_path = stages[-2].done_marker
    rows = summarize(stages, evaluation_path)
    shutil.copy(evaluation_path, os.path.join(final, "eval_vqa.json"))
    with open(os.path.join(final, "training_summary.json"), "w") as handle:
        json.dump(rows, handle, indent=2)
    ask_by_voice(args.work_dir, args.data_dir, final)
    print(f"\ndemo finished in {time.time() - start:.0f} s; the final model is {final}")


if __name__ == "__main__":
    from mmphi.errors import run_command

    run_command(main)
