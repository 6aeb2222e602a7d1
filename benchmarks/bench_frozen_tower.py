"""Stage 2 step time with the frozen tower run with and without autograd.

Thin command line; the code is mmphi/bench/frozen_tower.py (`--help` lists the flags).
"""

from mmphi.bench.frozen_tower import main

if __name__ == "__main__":
    main()
