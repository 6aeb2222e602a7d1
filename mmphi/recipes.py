"""The recipes, written once as data: the tiny offline pipeline (`make demo`, the stage docs, the benchmarks and
the smoke runs read them from here) and the benchmark workload sizes.

Each tiny recipe is a list of command-line flags for its stage (`mmphi.stages.<stage>.main(flags)`, or the same flags
after `python scripts/<stage script>.py`); data paths and output folders are added by the caller. BENCHMARKS.md
"Stages 1-2 tiny run" and "Stage 0" say what each reaches on a 2-core CPU and why its values were chosen.
"""

from __future__ import annotations

import shlex

from mmphi import TINY_TOKENIZER

# Stage 0, the `tiny` preset: block 128, batch 16, no accumulation. No activation checkpointing and plain AdamW: a
# 5M-parameter model has no memory to save, while recomputing and bitsandbytes' 8-bit CPU optimizer step cost time.
# 200 steps = 410K tokens, about 3 minutes of CPU time.
PRETRAIN_MAX_STEPS = 200
PRETRAIN = ("--config_name tiny --block_size 128 --per_device_train_batch_size 16 --gradient_accumulation_steps 1 "
            "--gradient_checkpointing false --optim adamw_torch --learning_rate 2e-3 --warmup_steps 0.05 "
            "--logging_steps 25 --disable_tqdm true")

# The tiny CLIP (the offline stand-in for TinyCLIP): ~7 epochs of the 2,700 synthetic training images. On
# 1,800 images (11 epochs) a linear probe found count in the tower's features for 96.5% of held-out images after 300
# steps (two seeds); 200 steps gave 92.5-94%, and held-out VQA count followed (87.5-95.8%). On 2,700, held-out VQA
# count is 98-99% (BENCHMARKS.md "Session 15 (#16)"). `--cache_pixels`: HF's image processor was half of each
# step (0.14 of ~0.29 s for 64 images); processed once and kept in memory (1.6 GB), the same weights train in 36 s
# instead of 86.
CLIP = ("--max_steps 300 --per_device_train_batch_size 64 --learning_rate 1e-3 --weight_decay 0.1 "
        "--warmup_steps 15 --lr_scheduler_type cosine --logging_steps 25 --cache_pixels")

# Stage 1 on an MM-Phi built from that CLIP: the tower is frozen, so its features are cached. The tiny Phi had a few
# minutes of stage 0, too weak for image tokens to steer while frozen, so the tiny stage 1 also trains it.
PROJECTOR = ("--train_language_model --cache_vision_features --max_steps 300 --per_device_train_batch_size 16 "
             "--gradient_accumulation_steps 1 --learning_rate 2e-3 --gradient_checkpointing false "
             "--optim adamw_torch --warmup_steps 20 --lr_scheduler_type cosine --logging_steps 50")

# Stage 2. The tiny Phi's lm_head must move for the short answers ("red", "3"): with LoRA + projector only, the answer
# loss stayed at 3.3 after 300 steps; saving lm_head with the adapter (and LoRA scale alpha/r = 2) brings it under 1.
# Random order, not the stage's group_by_length default: on one-word answers a record's length gives its answer away
# (" yes<eos>" is a token longer than " no<eos>"): length-grouped batches of single-turn yes/no records were 42 of 60
# all "yes" or all "no", and batches of the demo's mix skewed (yes share stdev 0.23, random 0.16). With random order
# the same 600 steps took yes/no from 50.5% to 89.2%, position from 42.9% to 57.1% (BENCHMARKS.md "#16").
# The synthetic data's short records (1-2 turns) took 0.31-0.55 s a step on this project's 2-core host, by the day;
# from cached features and with the model's own loss on a CPU (session 10), 0.37 s on a day it took 0.55 s before;
# with the tiny Phi's fused GELU (session 11), 0.31 s on a day it took 0.41 s before; scoring only the answer tokens
# (`skip_logits`, session 12) 10-15% less again.
# 2000 steps: with position 18% of the turns, 1500 steps gave held-out position 86.3-97.1% by the run (90.2, 93.1,
# 91.2, 86.3, 97.1), and 2000 steps 95.1% on the run that had 86.3% at 1500; at 0.37 s a step that is less time than
# 1500 steps took before session 10. 900 steps left position at 72-87%, 1000 at 72.5 / 85.3% (BENCHMARKS.md
# "Session 8" to "Session 11").
# `--learning_rate 5e-4` (sessions 12-15): at 1e-3 two of five stage-2 seeds under-fitted left/right (position 82.4
# and 85.3% held-out, 83.5% on their own training images), and 2e-3 was worse. On 2000 of the generator's images,
# 5e-4 gave every type >= 95.1% over four seeds; on 3000 (the default now), position 91.7-100% over five and the rest
# >= 95.6%. On 2000 images it cost the variant generator 3-6 points against 1e-3 (70.8 / 71.6% vs 76.9 / 75.0%;
# 76.4% at 5e-4 on 3000): a trade, kept for our data's pass criteria. 7e-4, between the two on the variant (76.3 /
# 72.7%), took the demo's own position to 89.2% on the earlier data and count to 91.1% on one of two seeds on
# session 14's (BENCHMARKS.md "Session 12 (#16)" to "Session 15 (#16)").
# `--cache_vision_features` (with the demo's stage-1 cache folder): the tower's features instead of decoding and
# encoding 16 images at every step.
INSTRUCT = ("--cache_vision_features --max_steps 2000 --train_sampling_strategy random "
            "--per_device_train_batch_size 16 --gradient_accumulation_steps 1 --learning_rate 5e-4 "
            "--gradient_checkpointing false --optim adamw_torch --warmup_steps 10 --lr_scheduler_type cosine "
            "--logging_steps 10 --val_fraction 0 --lora_alpha 128 --lora_dropout 0 "
            "--modules_to_save multi_modal_projector lm_head")

TINY = {"pretrain": PRETRAIN, "clip": CLIP, "projector": PROJECTOR, "instruct": INSTRUCT}

# Benchmark workloads (mmphi.bench.stages): micro-batch and tokens per sample of each stage, tiny and real size.
BENCHMARK_SIZES = {
    "tiny": {"pretrain": dict(batch=8, seq=128), "projector": dict(batch=8, seq=80),
             "instruct": dict(batch=4, seq=128, lora_r=16)},
    "real": {"pretrain": dict(batch=4, seq=2048), "projector": dict(batch=32, seq=128),
             "instruct": dict(batch=4, seq=2048, lora_r=64)},
}


def tiny_flags(stage: str) -> list[str]:
    """The tiny recipe of `stage` ("pretrain", "clip", "projector", "instruct") as a list of flags."""
    if stage not in TINY:
        raise ValueError(f"no tiny recipe for {stage!r}; known: {', '.join(TINY)}")
    return shlex.split(TINY[stage])


def tiny_pretrain_args(output_dir: str, train_files, max_steps: int = PRETRAIN_MAX_STEPS, eval_steps: int = 100,
                       max_eval_blocks: int | None = 256, extra=()) -> list[str]:
    """Stage 0's full tiny command line (the demo's): the recipe plus tokenizer, data, output and step counts."""
    args = [*tiny_flags("pretrain"), "--tokenizer_name", TINY_TOKENIZER, "--train_files", *train_files,
            "--output_dir", output_dir, "--max_steps", str(max_steps), "--eval_steps", str(eval_steps),
            "--save_steps", str(max_steps)]
    if max_eval_blocks is not None:
        args += ["--max_eval_blocks", str(max_eval_blocks)]
    return [*args, *extra]


def main(argv: list[str] | None = None) -> None:
    """`python -m mmphi.recipes STAGE` prints the stage's tiny flags, shell-quoted (for the shell recipes)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("stage", choices=sorted(TINY))
    print(shlex.join(tiny_flags(parser.parse_args(argv).stage)))


if __name__ == "__main__":
    main()
