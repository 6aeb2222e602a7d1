"""Synthetic images with exact ground truth, in the two formats the stages read (offline stand-in for COCO / LLaVA).

Thin command line; the code is mmphi/data/synthetic.py (`--help` lists the flags).
"""

from mmphi.data.synthetic import main
from mmphi.errors import run_command

if __name__ == "__main__":
    run_command(main)
