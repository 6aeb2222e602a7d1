"""Projector: pretrain the projector on image captions (COCO 2017 format) with HF Trainer.

Thin command line; the code is mmphi/stages/projector.py (`--help` lists the flags).
"""

from mmphi.errors import run_command
from mmphi.stages.projector import main

if __name__ == "__main__":
    run_command(main)
