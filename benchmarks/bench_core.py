"""Forward+backward time of MMPhiForCausalLM over the equivalent LlavaForConditionalGeneration, measured in one run.

Thin command line; the code is mmphi/bench/core.py (`--help` lists the flags).
"""

from mmphi.bench.core import main

if __name__ == "__main__":
    main()
