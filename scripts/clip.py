"""Tiny CLIP: the offline stand-in for TinyCLIP, trained with CLIP's own contrastive loss on COCO-format captions.

Thin command line; the code is mmphi/stages/clip.py (`--help` lists the flags).
"""

from mmphi.errors import run_command
from mmphi.stages.clip import main

if __name__ == "__main__":
    run_command(main)
