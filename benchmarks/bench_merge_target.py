"""Merge target of a QLoRA adapter (original vs NF4-dequantized weights), measured.

Thin command line; the code is mmphi/bench/merge_target.py (`--help` lists the flags).
"""

from mmphi.bench.merge_target import main

if __name__ == "__main__":
    main()
