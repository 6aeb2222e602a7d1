"""How much of a shapes dataset the tiny tower can learn at all, with direct labels (#16).

Thin command line; the code is mmphi/bench/tower_ceiling.py (`--help` lists the flags).
"""

from mmphi.bench.tower_ceiling import main

if __name__ == "__main__":
    main()
