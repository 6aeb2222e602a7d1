"""`make demo`: build the tiny MM-Phi, save it, reload it through the Auto classes and answer a question about an
image, offline on CPU. (The full pipeline -- stage 0, 1, 2, merge, evaluation, voice question -- grows here.)"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from build_model import build_tiny, save_mmphi  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers import AutoModelForCausalLM, AutoProcessor  # noqa: E402


def main(output_dir: str = "outputs/demo/mmphi-tiny") -> None:
    model, processor = build_tiny(seed=0)
    save_mmphi(model, processor, output_dir)
    print(f"saved the tiny MM-Phi to {output_dir}")
    model = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output_dir, trust_remote_code=True)
    image = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(image).ellipse((60, 60, 160, 160), fill="red")
    question = [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]
    messages = [{"role": "user", "content": question}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=image)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    print(f"prompt: {prompt!r}\nanswer (random weights, untrained): {answer!r}")


if __name__ == "__main__":
    main()
