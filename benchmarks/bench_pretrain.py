"""Stage 0 benchmark.

Thin command line; the code is mmphi/bench/pretrain.py (`--help` lists the flags).
"""

from mmphi.bench.pretrain import main

if __name__ == "__main__":
    main()
