"""Using MM-Phi as a user of a hub model does: a hub id resolved from the local cache (offline), an instruct adapter
run unmerged, images by URL and several per question, and LLaVA question files answered like `model_vqa`."""

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from PIL import Image

from mmphi import chat, inference
from mmphi.build import build_tiny, save_mmphi
from mmphi.data.synthetic import generate
from mmphi.inference import Chat, ChatTurn, GenerationOptions
from mmphi.loading import load_mmphi

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = GenerationOptions(max_new_tokens=6)


@pytest.fixture(scope="module")
def files(tmp_path_factory, draw_shape):
    root = tmp_path_factory.mktemp("hub_use")
    save_mmphi(*build_tiny(seed=0), str(root / "model"))
    return {"root": root, "model": str(root / "model"), "red": draw_shape(root / "red.png", "red"),
            "blue": draw_shape(root / "blue.png", "blue", "rectangle")}


@pytest.fixture(scope="module")
def loaded(files):
    return load_mmphi(files["model"])


def answer(model, processor, turn):
    return inference.answer_turn(model, processor, Chat(), turn, GREEDY).text


def test_a_hub_id_loads_from_a_cache_laid_out_like_a_download_offline(files, loaded, tmp_path):
    """`--model user/name` with the files only in the hub cache (models--user--name/snapshots/<commit>, refs/main),
    HF_HUB_OFFLINE=1: chat.py answers as it does from the folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--you--mmphi-tiny"
    shutil.copytree(files["model"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"),
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    question = "What colour is the circle?"
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "chat.py"), "--model", "you/mmphi-tiny",
                           "--image", files["red"], "--max_new_tokens", "6", "--no_stream", question],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == answer(*loaded, ChatTurn(question, image=files["red"]))
    for noise in ("torchvision", "kernels-community", "deprecated", "Warning"):  # a quiet start and turn
        assert noise not in done.stderr, done.stderr


def test_an_adapter_runs_unmerged_with_the_merged_models_answers(files, tmp_path):
    """LLaVA's --model-base: base + instruct LoRA adapter, unmerged, answers exactly as the merged folder (no
    quantization, so the merge is exact)."""
    from mmphi.stages import instruct

    data = generate(str(tmp_path / "data"), num_images=8, val_fraction=0.0, seed=2)
    out = tmp_path / "instruct"
    instruct.main(["--model_name_or_path", files["model"], "--data_path", data["llava_train"], "--image_folder",
                   data["images"], "--output_dir", str(out), "--load_in_4bit", "false", "--lora_r", "4",
                   "--max_steps", "3", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                   "--optim", "adamw_torch", "--learning_rate", "5e-2", "--warmup_steps", "0", "--val_fraction", "0",
                   "--save_strategy", "no", "--merge", "--merge_into", "original"])
    turns = [ChatTurn("What colour is the circle?", image=files["red"]), ChatTurn("What shape?", image=files["blue"])]
    merged = [answer(*load_mmphi(str(out / "merged")), turn) for turn in turns]
    unmerged_model, processor = load_mmphi(files["model"], adapter=str(out))
    assert type(unmerged_model).__name__.startswith("PeftModel")
    assert [answer(unmerged_model, processor, turn) for turn in turns] == merged
    # and the adapter is really applied: its logits differ from the base model's
    inputs, _ = inference.prepare_inputs(processor, [Chat()], turns[:1])
    base_model, _ = load_mmphi(files["model"])
    with torch.no_grad():
        assert not torch.allclose(unmerged_model(**inputs).logits, base_model(**inputs).logits)


@pytest.fixture(scope="module")
def http_server(files):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(files["root"]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_image_url_is_downloaded_and_answered_like_the_file(files, loaded, http_server):
    url = f"{http_server}/red.png"
    turn = ChatTurn("What colour is the circle?", image=url)
    assert list(turn.image.getdata()) == list(Image.open(files["red"]).convert("RGB").getdata())
    assert answer(*loaded, turn) == answer(*loaded, ChatTurn("What colour is the circle?", image=files["red"]))
    with pytest.raises(ValueError, match=rf"cannot load image {http_server}/missing.png"):
        ChatTurn("x", image=f"{http_server}/missing.png")


def test_chat_messages_take_images_by_url_in_the_processor_and_the_pipeline(files, loaded, http_server):
    """`{"type": "image", "url": ...}` in chat messages: the processor's chat template and the pipeline download it,
    with the file's pixels and answer."""
    from transformers import pipeline

    model, processor = loaded

    def chat(image_block):
        return [{"role": "user", "content": [image_block, {"type": "text", "text": "What colour is the circle?"}]}]

    by_url = processor.apply_chat_template(chat({"type": "image", "url": f"{http_server}/red.png"}),
                                           add_generation_prompt=True, tokenize=True, return_dict=True)
    by_path = processor.apply_chat_template(chat({"type": "image", "path": files["red"]}),
                                            add_generation_prompt=True, tokenize=True, return_dict=True)
    assert torch.equal(by_url["pixel_values"], by_path["pixel_values"])
    assert torch.equal(by_url["input_ids"], by_path["input_ids"])
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    blocks = ({"type": "image", "url": f"{http_server}/red.png"}, {"type": "image", "path": files["red"]})
    answers = [pipe(text=chat(block), max_new_tokens=6, do_sample=False)[0]["generated_text"][-1]["content"]
               for block in blocks]
    assert answers[0] == answers[1]
    assert answers[0].strip() == answer(model, processor, ChatTurn("What colour is the circle?", image=files["red"]))


def test_a_slow_image_download_stops_at_the_total_timeout():
    """A server that sends a byte every 0.2 s never trips httpx's per-read timeout; the download's total one stops
    it, naming the URL."""
    import time

    from processing_mmphi import open_image

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/slow.png"
    started = time.monotonic()
    with pytest.raises(ValueError, match=rf"Cannot read image {url}: not downloaded within 1 s"):
        open_image(url, timeout=1.0)
    assert time.monotonic() - started < 5
    server.shutdown()


def test_exif_orientation_is_applied_to_image_files_everywhere(tmp_path):
    """A photo stored sideways with an EXIF orientation tag is read upright by training, chat and the processor."""
    from mmphi.data.images import load_image as training_image
    from processing_mmphi import open_image

    upright = Image.new("RGB", (40, 20), "white")
    upright.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 20 x 40
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    path = tmp_path / "sideways.jpg"
    stored.save(path, exif=exif, quality=95)
    for image in (training_image(str(path)), open_image(path), ChatTurn("What is it?", image=str(path)).image):
        assert image.size == (40, 20)
        assert image.getpixel((2, 10))[0] > 200 and image.getpixel((2, 10))[1] < 60


def test_code_that_is_not_mmphis_own_runs_only_with_trust_remote_code(files, tmp_path):
    """MM-Phi's own model files load without a flag; an extra or edited Python file is refused, named, until
    --trust_remote_code; a processor folder (an adapter's) is checked too."""
    folder = tmp_path / "model"
    shutil.copytree(files["model"], folder)
    load_mmphi(str(folder))
    (folder / "helper.py").write_text("print('runs on load')\n")
    with open(folder / "modeling_mmphi.py", "a") as handle:
        handle.write("\n# edited\n")
    with pytest.raises(ValueError, match=r"code that is not this MM-Phi's own \(helper.py, modeling_mmphi.py: .*"
                                         r"pass --trust_remote_code"):
        load_mmphi(str(folder))
    with pytest.raises(ValueError, match="helper.py, modeling_mmphi.py"):
        chat.main(["--model", str(folder), "--image", files["red"], "What colour is the circle?"])
    model, _ = load_mmphi(str(folder), trust_remote_code=True)
    assert type(model).__name__ == "MMPhiForCausalLM"


def test_several_images_in_one_question_each_get_a_placeholder_in_order(files, loaded):
    model, processor = loaded
    turn = ChatTurn("Which one is red?", image=[files["red"], files["blue"]])
    conversation = Chat()
    inputs, _ = inference.prepare_inputs(processor, [conversation], [turn])
    assert inputs["pixel_values"].shape[0] == 2
    image_tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert image_tokens == 2 * processor.image_seq_length
    expected_pixels = processor.image_processor([Image.open(files["red"]).convert("RGB"),
                                                 Image.open(files["blue"]).convert("RGB")],
                                                return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"], expected_pixels)
    swapped = ChatTurn("Which one is red?", image=[files["blue"], files["red"]])
    swapped_inputs, _ = inference.prepare_inputs(processor, [Chat()], [swapped])
    torch.testing.assert_close(swapped_inputs["pixel_values"], expected_pixels.flip(0))
    text = inference.answer_turn(model, processor, conversation, turn, GREEDY).text
    assert text and conversation.images_per_turn == [2]
    conversation.undo()
    assert conversation.messages == [] and conversation.images == []


def generate_greedy(model, processor, messages: list, max_new_tokens: int = 6) -> str:
    """`model.generate` on one chat, the way the model card shows it."""
    images = [part["image"] for message in messages for part in message["content"] if part["type"] == "image"]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=images)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def test_image_text_to_text_pipeline_answers_like_generate(files):
    """The Auto class and the pipeline the model card names: one chat, a batch of chats, several images in one."""
    from transformers import AutoModelForImageTextToText, pipeline

    model = AutoModelForImageTextToText.from_pretrained(files["model"], trust_remote_code=True)
    assert type(model).__name__ == "MMPhiForCausalLM"
    pipe = pipeline("image-text-to-text", model=files["model"], trust_remote_code=True)
    red, blue = (Image.open(files[name]).convert("RGB") for name in ("red", "blue"))

    def chat(text, *images):
        return [{"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                             {"type": "text", "text": text}]}]

    chats = [chat("What colour is the circle?", red), chat("What shape is it?", blue),
             chat("Which one is red?", red, blue)]
    expected = [generate_greedy(pipe.model, pipe.processor, messages) for messages in chats]
    assert all(expected)
    single = pipe(text=chats[0], max_new_tokens=6, do_sample=False)
    batched = pipe(text=chats, max_new_tokens=6, do_sample=False)
    answers = [result[0]["generated_text"][-1]["content"] for result in batched]
    assert single[0]["generated_text"][-1]["content"] == expected[0]
    assert answers == expected


def test_llava_question_file_is_answered_like_model_vqa(files, loaded, http_server, tmp_path, capsys):
    questions = [{"question_id": 7, "image": "red.png", "text": "What colour is the circle?", "category": "conv"},
                 {"question_id": "b", "image": "blue.png", "text": "<image>\nWhat shape is it?"},
                 {"question_id": 9, "image": f"{http_server}/red.png", "text": "Is it round?"}]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers_file = tmp_path / "answers" / "answers.jsonl"
    chat.main(["--model", files["model"], "--question_file", str(path), "--image_folder", str(files["root"]),
               "--answers_file", str(answers_file), "--max_new_tokens", "6", "--batch_size", "2"])
    lines = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert [line["question_id"] for line in lines] == [7, "b", 9]
    assert [line["prompt"] for line in lines] == [q["text"] for q in questions]
    assert set(lines[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert lines[0]["model_id"] == "model" and len({line["answer_id"] for line in lines}) == 3
    expected = [answer(*loaded, ChatTurn(q["text"].replace("<image>", "").strip(),
                                         image=str(files["root"] / "red.png") if i != 1 else files["blue"]))
                for i, q in enumerate(questions)]
    assert [line["text"] for line in lines] == expected
    path.write_text(json.dumps({"question_id": 1, "image": "nowhere.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="questions.jsonl, line 1: image file not found: nowhere.png"):
        inference.read_questions(str(path), str(files["root"]))


def test_a_missing_local_folder_is_named_not_taken_for_a_hub_id(tmp_path):
    from mmphi.loading import load_causal_lm, looks_local

    with pytest.raises(FileNotFoundError, match="no such model folder: .*instruct/merged"):
        load_causal_lm(str(tmp_path / "instruct" / "merged"))
    assert [looks_local(p) for p in ("microsoft/phi-2", "gpt2", "./out", "outputs/demo/instruct", "/tmp/x")] == [
        False, False, True, True, True]


def test_an_adapter_refuses_a_base_it_was_not_trained_on(files, tmp_path):
    """The adapter records its base's weights fingerprint; loading or merging it onto another base of the same
    shapes stops with both named (unless --allow_other_base), while a copy of its base elsewhere passes."""
    from mmphi.loading import merge_lora, weights_fingerprint
    from mmphi.stages import instruct

    data = generate(str(tmp_path / "data"), num_images=8, val_fraction=0.0, seed=2)
    adapter = tmp_path / "instruct"
    instruct.main(["--model_name_or_path", files["model"], "--data_path", data["llava_train"], "--image_folder",
                   data["images"], "--output_dir", str(adapter), "--load_in_4bit", "false", "--lora_r", "4",
                   "--max_steps", "2", "--per_device_train_batch_size", "2", "--optim", "adamw_torch",
                   "--val_fraction", "0", "--save_strategy", "no", "--report_to", "none"])
    with open(adapter / "run_info.json") as handle:
        assert json.load(handle)["base_fingerprint"] == weights_fingerprint(files["model"])
    other = tmp_path / "other"
    save_mmphi(*build_tiny(seed=1), str(other))
    with pytest.raises(ValueError, match=r"trained on another base than .*other .*--allow_other_base"):
        load_mmphi(str(other), adapter=str(adapter))
    with pytest.raises(ValueError, match="--allow_other_base"):
        merge_lora(str(other), str(adapter), merge_into="original")
    model, _ = load_mmphi(str(other), adapter=str(adapter), allow_other_base=True)
    assert type(model).__name__.startswith("PeftModel")
    shutil.copytree(files["model"], tmp_path / "moved")
    model, _ = load_mmphi(str(tmp_path / "moved"), adapter=str(adapter))
    assert type(model).__name__.startswith("PeftModel")
