"""Forward+backward time of MMPhiForCausalLM over the equivalent LlavaForConditionalGeneration, measured in one run.

Same sub-configs, same weights (copied), same inputs; timings interleaved (A, B, A, B, ...) so machine noise hits
both alike; the median of each is compared. The ratio must be <= 1.05 (MM-Phi adds nothing to Llava's path).

    python -m benchmarks.core [--hidden 256 --layers 4 --batch 4 --text_tokens 32 --repeats 15]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import LlavaForConditionalGeneration

from configuration_mmphi import TINY_TEXT_CONFIG, TINY_VISION_CONFIG, MMPhiConfig
from mmphi.export import llava_config
from modeling_mmphi import MMPhiForCausalLM


def build_pair(hidden: int, layers: int):
    text = {**TINY_TEXT_CONFIG, "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers}
    config = MMPhiConfig(
        vision_config=dict(TINY_VISION_CONFIG), text_config=text, projector_type="mlp2x_gelu", image_token_index=4000
    )
    llava = LlavaForConditionalGeneration(llava_config(config))
    mmphi = MMPhiForCausalLM(config)
    mmphi.load_state_dict(llava.state_dict(), strict=False)
    torch.nn.init.zeros_(mmphi.lm_head.bias)
    return mmphi.train(), llava.train(), config


def step_seconds(model, batch) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="1 is steadiest on a shared 2-core machine")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mmphi, llava, config = build_pair(args.hidden, args.layers)
    ids = torch.randint(5, 3000, (args.batch, args.text_tokens))
    ids = torch.cat([ids[:, :2], torch.full((args.batch, config.image_seq_length), config.image_token_index), ids], 1)
    batch = {"input_ids": ids, "pixel_values": torch.randn(args.batch, 3, 224, 224), "labels": ids}
    for _ in range(3):  # warm-up
        step_seconds(mmphi, batch), step_seconds(llava, batch)
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(step_seconds(mmphi, batch))
        theirs.append(step_seconds(llava, batch))
    result = {
        "mmphi_ms": 1000 * statistics.median(ours),
        "llava_ms": 1000 * statistics.median(theirs),
    }
    result["ratio"] = result["mmphi_ms"] / result["llava_ms"]
    # the fastest of each is the least disturbed by other processes on a shared machine
    result["ratio_of_best"] = min(ours) / min(theirs)
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(
        f"fwd+bwd, batch {args.batch} x {ids.shape[1]} tokens ({config.image_seq_length} image), hidden {args.hidden}, "
        f"{args.layers} layers "
        f"[{machine}]\n  MMPhiForCausalLM {result['mmphi_ms']:.1f} ms | LlavaForConditionalGeneration "
        f"{result['llava_ms']:.1f} ms | ratio of medians {result['ratio']:.3f}, "
        f"of best runs {result['ratio_of_best']:.3f}"
    )
    return result


if __name__ == "__main__":
    main()
