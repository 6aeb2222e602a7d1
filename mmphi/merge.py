"""Merge an instruct LoRA adapter (with its trained projector) into its base: a full MM-Phi folder.

    python scripts/merge_lora.py --model_name_or_path outputs/projector --adapter outputs/instruct \
        --output_dir outputs/instruct-merged

The result is full precision. A QLoRA adapter was trained against the NF4-rounded base, so by default it is merged into
those dequantized weights (`--merge_into dequantized`; BENCHMARKS.md "Instruct" measures how much closer that is to
the 4-bit base + adapter than `--merge_into original`, the unquantized weights). LoRA deltas are folded into the
weights, and the adapter's copy of the projector (`modules_to_save`) replaces the base's. The folder holds
safetensors weights, the config, the processor and the model code, and loads with
`AutoModelForCausalLM.from_pretrained(D, trust_remote_code=True)`.
"""

from __future__ import annotations

import argparse
import logging

import torch

from mmphi.loading import MERGE_TARGETS, QUANTIZATION_CHOICES, merge_lora


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True,
                        help="the base MM-Phi folder (the projector stage's output)")
    parser.add_argument("--adapter", required=True, help="the instruct adapter folder")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the merged weights (for --merge_into dequantized: the one instruct loaded with)")
    parser.add_argument("--merge_into", default="dequantized", choices=MERGE_TARGETS,
                        help="dequantized: the NF4 weights the adapter was trained on; original: the unquantized ones")
    parser.add_argument("--base_quantization", default="4bit", choices=QUANTIZATION_CHOICES,
                        help="how instruct loaded the base (its --load_in_4bit / --load_in_8bit)")
    parser.add_argument("--quantized_from", default=None, choices=["float32", "bfloat16", "float16"],
                        help="the dtype instruct loaded the base in before quantizing (bf16 on most GPUs; default "
                             "--dtype): the NF4 round trip then matches training bit for bit")
    parser.add_argument("--allow_other_base", action="store_true",
                        help="merge even when the adapter's run_info.json records another base than "
                             "--model_name_or_path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    merge_lora(args.model_name_or_path, args.adapter, args.output_dir, getattr(torch, args.dtype), args.merge_into,
               args.base_quantization, getattr(torch, args.quantized_from) if args.quantized_from else None,
               allow_other_base=args.allow_other_base)


if __name__ == "__main__":
    from mmphi.errors import run_command

    run_command(main)
