"""Stage-1 benchmarks, in one run on the same models and data (writes outputs/bench_stage1.json, prints a table).

Thin command line; the code is mmphi/bench/stage1.py (`--help` lists the flags).
"""

from mmphi.bench.stage1 import main

if __name__ == "__main__":
    main()
