"""Merge a stage-2 LoRA adapter (with its trained projector) into its base: a full MM-Phi folder.

    python scripts/merge_lora.py --model_name_or_path outputs/stage1 --adapter outputs/stage2 \
        --output_dir outputs/stage2-merged

The base is loaded in full precision (never 4-bit, even when the adapter was trained on a 4-bit base: a QLoRA
adapter is merged into the unquantized weights it approximates), LoRA deltas are folded into the weights, and the
adapter's copy of the projector (`modules_to_save`) replaces the base's. The folder holds safetensors weights, the
config, the processor and the model code, and loads with `AutoModelForCausalLM.from_pretrained(D,
trust_remote_code=True)`.
"""

from __future__ import annotations

import argparse
import logging

import torch

from mmphi.loading import merge_lora


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="the base MM-Phi folder (stage 1 output)")
    parser.add_argument("--adapter", required=True, help="the stage-2 adapter folder")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the merged weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    merge_lora(args.model_name_or_path, args.adapter, args.output_dir, getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
