"""scripts/web_demo.py, end to end: train a small checkpoint with train.py, serve the page in a
subprocess, and drive it with Playwright in the system Chromium (Playwright's own browser
download is not reachable here; `apt-get install chromium` provides it, and CI installs it).

The page must answer exactly as infer.py does, show the base's answer beside it, show the
freeze table and the loss curve, and turn bad input and a refused checkpoint into a readable
message. It writes docs/web_demo.png, the README's screenshot."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from helpers import save_video
from PIL import Image

import scripts.web_demo
import scripts.web_demo_answers
import scripts.web_demo_panel
from config import ModelArguments
from data.dataset import read_records
from data.media import load_video_frames
from fixtures.tiny_vlms import make_tiny_vlm
from model.freeze import apply_freeze_policy
from model.released import load_released_processor
from run.checkpoint import load_base, save_checkpoint
from run.predict import generate_answers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCREENSHOT = os.path.join(REPO_ROOT, "docs", "web_demo.png")
TIMEOUT_S = 600  # a hang guard on a shared machine, not a benchmark


def chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.isfile("/usr/bin/chromium") else None)
    if path is None:
        pytest.fail("No Chromium for Playwright: `apt-get install chromium` (CI's .ci/run installs it).", pytrace=False)
    return path


def script_env(tmp: str) -> dict:
    """One OpenMP thread: on shared cores two threads of matrices this small spin-wait each
    other (a 120-step run went from 5 s to 97 s); every process here gets the same count, so the
    page and infer.py compute alike. Gradio's uploads go to the test's folder, no analytics."""
    return {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": os.path.join(tmp, "gradio")}


# The demo's own paths (configs/demo.yaml), relative to a checkout-like working folder: the page
# runs exactly as README's command runs it, and the screenshot shows those names.
CHECKPOINT, DATA = "outputs/demo", "outputs/demo-data"


@pytest.fixture(scope="module")
def workdir(tiny_base, demo_data, tmp_path_factory) -> str:
    """outputs/tiny-base (the seeded tiny base) and outputs/demo-data (64 + 16 records), copied."""
    root = str(tmp_path_factory.mktemp("web_demo"))
    shutil.copytree(os.path.dirname(tiny_base["llm"]), os.path.join(root, "outputs", "tiny-base"))
    shutil.copytree(demo_data["image_folder"], os.path.join(root, DATA))
    return root


@pytest.fixture(scope="module")
def checkpoint(workdir) -> str:
    """configs/demo.yaml for 120 steps of 8 (~5 s of training): real words, not accuracy. It
    evaluates 8 held-out records every 40 steps, for the page's accuracy curve."""
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "train.py"), os.path.join(REPO_ROOT, "configs", "demo.yaml"),
         "--max_steps", "120", "--per_device_train_batch_size", "8",
         "--warmup_steps", "10", "--logging_steps", "10", "--eval_steps", "40", "--eval_max_samples", "8"],
        cwd=workdir, capture_output=True, text=True, timeout=TIMEOUT_S, env=script_env(workdir),
    )
    assert result.returncode == 0, f"train.py exited {result.returncode}:\n{result.stderr[-5000:]}"
    return CHECKPOINT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, log_path: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        with open(log_path) as log:
            assert proc.poll() is None, f"web_demo.py exited {proc.returncode}:\n{log.read()[-5000:]}"
            assert time.monotonic() < deadline, f"web_demo.py not up after {timeout_s} s:\n{log.read()[-5000:]}"
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    """The whole process group: the page and anything it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def serve(workdir: str, *pages: list[str]):
    """One web_demo.py per argument list, started together (their ~15 s of imports overlap),
    each in its own process group, all stopped however the test ends. Yields their URLs."""
    procs = []
    try:
        for argv in pages:
            port = free_port()
            log_path = os.path.join(workdir, f"web_demo_{port}.log")
            with open(log_path, "w") as log:
                proc = subprocess.Popen(  # `python -m scripts.web_demo`, the repository's root on the path
                    [sys.executable, "-m", "scripts.web_demo", *argv, "--port", str(port)],
                    cwd=workdir,
                    stdout=log, stderr=subprocess.STDOUT, env={**script_env(workdir), "PYTHONPATH": REPO_ROOT},
                    start_new_session=True,
                )
            procs.append((proc, f"http://127.0.0.1:{port}/", log_path))
        for proc, url, log_path in procs:
            wait_until_up(proc, url, log_path)
        yield [url for _, url, _ in procs]
    finally:
        for proc, _, _ in procs:
            stop(proc)


@pytest.fixture(scope="module")
def refused_checkpoint(checkpoint, workdir) -> str:
    """A delta whose manifest names other base weights: run.checkpoint refuses it."""
    refused = "outputs/refused"
    shutil.copytree(os.path.join(workdir, checkpoint), os.path.join(workdir, refused))
    manifest_path = os.path.join(workdir, refused, "vlm_manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["base_fingerprint"]["llm"] = "0123456789abcdef"
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    return refused


@pytest.fixture(scope="module")
def urls(checkpoint, refused_checkpoint, workdir):
    """{"page": the checkpoint's page, with --data (README's command); "refused": the refused
    checkpoint's page}."""
    page = ["--checkpoint", checkpoint, "--data", f"{DATA}/eval.json", "--image_folder", DATA]
    with serve(workdir, page, ["--checkpoint", refused_checkpoint]) as (page_url, refused_url):
        yield {"page": page_url, "refused": refused_url}


@pytest.fixture(scope="module")
def browser():
    # Local: playwright is optional (requirements-dev.txt only); the helper tests below run without it.
    from playwright.sync_api import sync_playwright

    executable = chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, urls):
    page = browser.new_page(viewport={"width": 1280, "height": 960})
    page.goto(urls["page"])
    page.wait_for_selector("#ask")
    yield page
    page.close()


def eval_record(workdir: str, index: int) -> dict:
    with open(os.path.join(workdir, DATA, "eval.json")) as f:
        return json.load(f)[index]


def ask(page, question: str, image: str | None = None) -> None:
    if image:
        page.locator("#images input[type=file]").set_input_files(image)
        page.locator("#images img").first.wait_for()  # uploaded: the gallery shows it
    page.locator("#question textarea").fill(question)
    page.locator("#ask").click()


def answers(page) -> tuple[str, str]:
    page.wait_for_function("document.querySelector('#base textarea').value.length > 0")
    return page.locator("#finetuned textarea").input_value(), page.locator("#base textarea").input_value()


@pytest.mark.browser
@pytest.mark.slow
def test_page_describes_the_checkpoint(page):
    info = page.locator("#checkpoint-info").inner_text()
    for words in ("vision", "connector", "llm", "trainable", "mlp2x_gelu", "120 of 120"):
        assert words in info, (words, info)
    # The freeze table's rows: configs/demo.yaml trains every component.
    for component in ("vision", "connector", "llm"):
        assert re.search(rf"^{component}\s+full\s", info, re.M), info
    # The loss curve is a drawn plot (Vega renders a canvas or an svg), not a table.
    page.locator("#loss-plot canvas, #loss-plot svg.marks").first.wait_for()
    assert page.locator("#loss-plot table").count() == 0
    # Below it, the held-out accuracy train.py logged every 40 steps.
    page.locator("#accuracy-plot canvas, #accuracy-plot svg.marks").first.wait_for()
    assert re.search(r"held-out accuracy: [01]\.\d{3} at step 120 \(8 records\)", page.locator("#accuracy-plot").inner_text())


@pytest.mark.browser
@pytest.mark.slow
def test_finetuned_answer_is_infer_py_answer_and_base_answers_beside_it(page, checkpoint, workdir):
    record = eval_record(workdir, 0)  # held out: the run never trained on it
    image = os.path.join(workdir, DATA, record["image"])
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    infer = subprocess.Popen(  # runs while the browser works
        [sys.executable, os.path.join(REPO_ROOT, "infer.py"), "--checkpoint", checkpoint, "--image", image,
         "--prompt", question],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env(workdir),
    )
    ask(page, question, image)
    finetuned, base = answers(page)
    stdout, stderr = infer.communicate(timeout=TIMEOUT_S)
    assert infer.returncode == 0, stderr[-3000:]
    lines = stdout.splitlines()
    assert finetuned == (lines[-1] if lines else "")
    assert finetuned, "120 steps should give a non-empty answer, or the comparison proves little"
    assert base.strip()
    assert "Error" not in page.locator("#status").inner_text()


@pytest.mark.browser
@pytest.mark.slow
def test_picker_fills_the_question_and_shows_the_expected_answer(page, workdir):
    """A --data record: its image, its question, its expected answer; then both answers, and
    the README's screenshot."""
    record = eval_record(workdir, 1)
    page.locator("#picker input").click()
    page.get_by_role("option").nth(1).click()
    page.wait_for_function("document.querySelector('#expected textarea').value.length > 0")
    assert page.locator("#expected textarea").input_value() == record["conversations"][1]["value"]
    assert page.locator("#question textarea").input_value() == record["conversations"][0]["value"]
    assert page.locator("#images img").count() == 1
    page.locator("#ask").click()
    assert all(answers(page))
    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    page.screenshot(path=SCREENSHOT, full_page=True)


@pytest.mark.browser
@pytest.mark.slow
def test_bad_input_is_a_readable_error(page):
    status = page.locator("#status")
    ask(page, "   ")  # no question
    page.wait_for_function("document.querySelector('#status').innerText.includes('Error')")
    assert "Type a question" in status.inner_text()
    ask(page, "<image>\nWhat color are the shapes?")  # needs an image; none uploaded
    page.wait_for_function("document.querySelector('#status').innerText.includes('marker')")
    text = status.inner_text()
    assert "1 <image> marker(s) for 0 image(s)" in text.replace("`", "") and "Traceback" not in text
    assert page.locator("#finetuned textarea").input_value() == ""


@pytest.mark.browser
@pytest.mark.slow
def test_refused_checkpoint_shows_the_loaders_message(browser, urls):
    """The page still starts, says why the loader refused, and offers nothing to ask."""
    page = browser.new_page()
    try:
        page.goto(urls["refused"])
        status = page.locator("#status")
        status.get_by_text("Base fingerprint mismatch").wait_for()
        assert "0123456789abcdef" in status.inner_text()
        assert page.locator("#ask").is_disabled()
    finally:
        page.close()


@pytest.fixture(scope="module")
def web_demo():
    """The script as a module, for its loader (no server)."""
    return scripts.web_demo


@pytest.fixture(scope="module")
def handlers():
    """The page's question and answer handlers."""
    return scripts.web_demo_answers


def test_unreadable_and_huge_images_are_refused_in_words(handlers, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    huge = tmp_path / "huge.png"
    Image.new("1", (5000, 4000)).save(huge)  # 20 Mpixel, a few KB on disk
    with pytest.raises(handlers.PageError, match="cannot be read as an image"):
        handlers.read_images([str(broken)])
    with pytest.raises(handlers.PageError, match="5000x4000: more than"):
        handlers.read_images([str(huge)])


def test_picker_reads_multi_image_and_video_records(handlers, tmp_path):
    """--data records as read_records gives them: "image" a list, "video" a folder of frames or an
    mp4 (its decoded frames go to the gallery, which keeps them as PNG: the pixels the model sees)."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    os.makedirs(tmp_path / "clip")
    for i in range(5):
        Image.new("RGB", (8, 8)).save(tmp_path / "clip" / f"frame_{i}.png")
    with open(tmp_path / "data.json", "w") as f:
        json.dump([
            {"id": "two", "image": ["a.png", "b.png"],
             "conversations": [{"from": "human", "value": "<image> vs <image>: which is red?"}, {"from": "gpt", "value": "a"}]},
            {"id": "clip", "video": "clip",
             "conversations": [{"from": "human", "value": "What happens?"}, {"from": "gpt", "value": "nothing"}]},
            {"id": "movie", "video": "movie.mp4",
             "conversations": [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "it reddens"}]},
        ], f)
    save_video(str(tmp_path / "movie.mp4"), 6)
    records = read_records(str(tmp_path / "data.json"))
    paths, question, expected, status, _ = handlers.pick_record(records, str(tmp_path), 3, "0")
    assert [os.path.basename(p) for p in paths] == ["a.png", "b.png"] and expected == "a" and status == ""
    assert len(handlers.build_prompt(question, handlers.read_images(paths))) == 1
    paths, question, expected, _, _ = handlers.pick_record(records, str(tmp_path), 3, "1")
    assert len(paths) == 3 and question.count("<image>") == 3 and expected == "nothing"
    with pytest.raises(handlers.PageError, match="3 `<image>` marker"):
        handlers.build_prompt(question, [])
    frames, question, expected, status, _ = handlers.pick_record(records, str(tmp_path), 3, "2")
    assert question.count("<image>") == 3 and expected == "it reddens" and status == ""
    reference = load_video_frames(str(tmp_path / "movie.mp4"), 3)
    assert [np.asarray(f).tolist() for f in frames] == [np.asarray(f).tolist() for f in reference]


@pytest.mark.slow
def test_two_images_and_sampling_answer_on_both_models(web_demo, handlers, checkpoint, workdir, monkeypatch):
    """The page's handler in-process: a two-image question, greedy and sampled."""
    monkeypatch.chdir(workdir)  # the manifest names the base relative to the run's folder
    models = web_demo.load_models(web_demo.WebDemoArguments(checkpoint=checkpoint))
    assert "error" not in models, models.get("error")
    gallery = [(os.path.join(DATA, eval_record(workdir, i)["image"]), None) for i in (0, 1)]
    question = "<image> and <image>: what color are the shapes?"
    for mode in ("greedy", "sample"):
        finetuned, base, status = handlers.answer(models, gallery, question, 8, mode, 0.7)
        assert finetuned and base and "Error" not in status, (mode, finetuned, base, status)


def test_the_page_serves_a_released_vlm_checkpoint(web_demo, handlers, tmp_path):
    """A released VLM's checkpoint: the page's loader opens it and its base, describes it, and the
    fine-tuned answer is infer.py's (the same generate_answers on the same loaded model)."""
    base = make_tiny_vlm("qwen2_5_vl", str(tmp_path / "base"))
    args = ModelArguments(vlm_model=base, lora_enable=True, lora_r=4)
    model = load_base(args)
    apply_freeze_policy(model, args)
    save_checkpoint(model, str(tmp_path / "ckpt"), load_released_processor(args), seed=0)
    image = tmp_path / "red.png"
    Image.new("RGB", (48, 48), (220, 20, 20)).save(image)

    models = web_demo.load_models(web_demo.WebDemoArguments(checkpoint=str(tmp_path / "ckpt")))
    assert "error" not in models, models.get("error")
    panel = scripts.web_demo_panel.describe(models, {})
    assert f"**released VLM** `{base}`" in panel and "llm" in models["freeze_table"]
    finetuned, base_answer, _ = handlers.answer(models, [(str(image), None)], "What color?", 8, "greedy", 1.0)
    messages = [{"role": "user", "content": "<image>\nWhat color?"}]
    expected = generate_answers(models["finetuned"], models["inputs"], [(messages, [Image.open(image).convert("RGB")])], 8)
    assert finetuned == expected[0] and isinstance(base_answer, str)
