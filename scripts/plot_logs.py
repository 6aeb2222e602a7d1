"""Draw the loss curve of any stage's run from its `trainer_state.json` (HF Trainer's log history) into a PNG.

Thin command line; the code is mmphi/plots.py (`--help` lists the flags).
"""

from mmphi.errors import run_command
from mmphi.plots import main

if __name__ == "__main__":
    run_command(main)
