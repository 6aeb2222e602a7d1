"""Benchmark harness: one training step of each stage, through the stage's own Trainer and through a bare PyTorch.

Thin command line; the code is mmphi/bench/stages.py (`--help` lists the flags).
"""

from mmphi.bench.stages import main

if __name__ == "__main__":
    main()
