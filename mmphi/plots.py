"""Draw the loss curve of any stage's run from its `trainer_state.json` (HF Trainer's log history) into a PNG.

Usage:
    python scripts/plot_logs.py outputs/pretrain                 # -> outputs/pretrain/loss_curve.png
    python scripts/plot_logs.py outputs/pretrain/checkpoint-500/trainer_state.json --output curve.png
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re


def find_trainer_state(path: str) -> str:
    """A trainer_state.json file, or the one in a run dir (its own, else its newest checkpoint's)."""
    if os.path.isfile(path):
        return path
    candidate = os.path.join(path, "trainer_state.json")
    if os.path.isfile(candidate):
        return candidate
    checkpoints = sorted(glob.glob(os.path.join(path, "checkpoint-*", "trainer_state.json")),
                         key=lambda p: int(re.search(r"checkpoint-(\d+)", p).group(1)))
    if checkpoints:
        return checkpoints[-1]
    raise FileNotFoundError(f"{path}: no trainer_state.json here or in a checkpoint-* folder")


def loss_series(log_history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)} for every logged key that is a loss (loss, eval_loss, eval_<name>_loss, ...)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        for key, value in entry.items():
            # `train_loss` is the run's mean, logged once at the end: not a point of the curve
            if key.endswith("loss") and key != "train_loss" and isinstance(value, (int, float)) and "step" in entry:
                steps, values = series.setdefault(key, ([], []))
                steps.append(entry["step"])
                values.append(float(value))
    return series


def plot_trainer_state(path: str, output_png: str | None = None, title: str | None = None) -> str:
    """Write the loss curve PNG (train loss as a line, held-out losses as marked lines); returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    state_path = find_trainer_state(path)
    with open(state_path, encoding="utf-8") as f:
        state = json.load(f)
    series = loss_series(state.get("log_history", []))
    if not series:
        raise ValueError(f"{state_path}: log_history has no loss entries to plot (was logging_steps too large?)")
    if output_png is None:
        run_dir = path if os.path.isdir(path) else os.path.dirname(state_path)
        output_png = os.path.join(run_dir, "loss_curve.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, (steps, values) in sorted(series.items()):
        is_eval = key.startswith("eval")
        ax.plot(steps, values, marker="o" if is_eval else None, markersize=4,
                label="training loss" if key == "loss" else key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or os.path.basename(os.path.abspath(os.path.dirname(state_path))))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_png, dpi=100)
    plt.close(fig)
    return output_png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="run output dir, checkpoint dir or trainer_state.json")
    parser.add_argument("--output", default=None, help="PNG path (default: <run dir>/loss_curve.png)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    print(plot_trainer_state(args.path, args.output, args.title))


if __name__ == "__main__":
    from mmphi.errors import run_command

    run_command(main)
