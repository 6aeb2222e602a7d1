"""The DeepSpeed ZeRO end-to-end check of benchmarks/gpu_check.sh: after a stage ran under
`accelerate launch --config_file scripts/configs/deepspeed_<zero>.yaml`, its final folder must load with the Auto
classes (a save of ZeRO-3's empty placeholders does not: their shapes mismatch) and carry a projector that moved
from the initial model's.

    python -m benchmarks.zero check --config zero3 --exit_code 0 --seconds 41.2 --processes 1 \
        --folder /tmp/zero3 --initial /tmp/mmphi-tiny --rows rows.jsonl
    python -m benchmarks.zero report --rows rows.jsonl --json zero.json --markdown gpu_check.md --extra "..."
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import time


def weights(folder: str) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors


def first_error(log_path: str) -> str | None:
    """The first `SomethingError: ...` line of a launch's log (torchrun's own ChildFailedError left out)."""
    if not os.path.isfile(log_path):
        return None
    with open(log_path, errors="replace") as handle:
        errors = [line.strip() for line in handle
                  if re.search(r"\w+(Error|Exception)\b.*:", line) and "ChildFailedError" not in line]
    return errors[0][:300] if errors else None


def check_folder(folder: str, initial: str) -> dict:
    """Load `folder` as a user would and compare its projector with `initial`'s; raises on what is wrong."""
    from transformers import AutoModelForCausalLM

    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    row = {"load_s": round(time.time() - start, 1), "model_class": type(model).__name__}
    saved, before = weights(folder), weights(initial)
    row["saved_dtypes"] = sorted({str(t.dtype).removeprefix("torch.") for t in saved.values()})
    projector = [name for name in saved if "multi_modal_projector" in name and name in before]
    if not projector:
        raise RuntimeError("no projector weights in the save")
    # in the saved dtype, so that a bf16 save of untrained weights reads as 0
    row["projector_moved"] = max((saved[name].float() - before[name].to(saved[name].dtype).float()).abs().max().item()
                                 for name in projector)
    if row["projector_moved"] == 0:
        raise RuntimeError("the saved projector equals the initial one")
    return row


def check(config: str, exit_code: int, seconds: float, processes: int, folder: str, initial: str) -> dict:
    """One config's row: pass, or fail with the reason (the launch's first error, or what the folder lacks)."""
    row = {"config": config, "stage": "projector", "processes": processes, "launch_exit": exit_code,
           "train_save_s": seconds}
    try:
        if exit_code != 0:
            error = first_error(folder + ".log")
            raise RuntimeError(f"the launch exited {exit_code}" + (f": {error}" if error else ""))
        row |= check_folder(folder, initial)
        row["result"] = "pass"
    except Exception as error:  # recorded, and the next config runs
        row |= {"result": "fail", "error": f"{type(error).__name__}: {error}"[:500]}
    return row


def markdown(rows: list[dict], version: str) -> str:
    lines = ["", f"### DeepSpeed ZeRO end to end (projector, tiny MM-Phi, bf16, {rows[0]['processes']} process(es), "
             f"deepspeed {version})", "",
             "| config | result | train + save (s) | load (s) | saved dtypes | projector moved | error |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        moved = f"{row['projector_moved']:.2e}" if "projector_moved" in row else ""
        lines.append(f"| {row['config']} | **{row['result']}** | {row['train_save_s']} | {row.get('load_s', '')} | "
                     f"{', '.join(row.get('saved_dtypes', []))} | {moved} | {row.get('error', '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def report(rows_path: str, json_path: str, markdown_path: str, extra: str) -> None:
    with open(rows_path) as handle:
        rows = [json.loads(line) for line in handle]
    try:
        import deepspeed

        version = deepspeed.__version__
    except Exception as error:  # it imported before the launches
        version = f"? ({type(error).__name__})"
    with open(json_path, "w") as handle:
        json.dump({"deepspeed": version, "stage": "projector", "model": "tiny random MM-Phi",
                   "recipe": "recipes/smoke/projector.yaml --bf16 true " + extra, "runs": rows}, handle, indent=1)
    with open(markdown_path, "a") as handle:
        handle.write(markdown(rows, version))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("check", help="check one config's final folder; append its row to --rows")
    one.add_argument("--config", required=True)
    one.add_argument("--exit_code", type=int, required=True)
    one.add_argument("--seconds", type=float, required=True)
    one.add_argument("--processes", type=int, required=True)
    one.add_argument("--folder", required=True)
    one.add_argument("--initial", required=True)
    one.add_argument("--rows", required=True)
    gathered = commands.add_parser("report", help="the rows as zero.json and a gpu_check.md table")
    gathered.add_argument("--rows", required=True)
    gathered.add_argument("--json", required=True)
    gathered.add_argument("--markdown", required=True)
    gathered.add_argument("--extra", default="")
    args = parser.parse_args(argv)
    if args.command == "check":
        row = check(args.config, args.exit_code, args.seconds, args.processes, args.folder, args.initial)
        print("zero:", json.dumps(row))
        with open(args.rows, "a") as handle:
            handle.write(json.dumps(row) + "\n")
    else:
        report(args.rows, args.json, args.markdown, args.extra)


if __name__ == "__main__":
    main()
