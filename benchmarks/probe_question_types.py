"""Why a question type fails (#16): data mix, linear probes on the stage-1 features, the final model's answers.

Thin command line; the code is mmphi/bench/question_types.py (`--help` lists the flags).
"""

from mmphi.bench.question_types import main

if __name__ == "__main__":
    main()
