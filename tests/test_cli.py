"""The command line as a user meets it: the one test command sets up a fresh machine, `--help`
lists the settings it accepts, a user's mistake is one message and exit status 2 (never a
traceback), a wandb recipe without a login logs offline instead of dying late, and the launch
scripts size themselves to the machine (processes, DataLoader workers)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from importlib.metadata import version
from types import SimpleNamespace

import pytest
import torch
import yaml

import cli
import cli_help
import config
from cli import parse_config
from config import TrainArguments
from data.media import ImageError
from data.prompt import MarkerMismatch, SampleTooLong, TemplateMismatch
from data.records import DataError
from errors import ConfigError, UserError
from model.freeze import FreezeError
from run import environment
from run.checkpoint import CheckpointError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600
# Not the conftest's WANDB_MODE=disabled: these runs are the user's.
USER_ENV = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "VLM_DEBUG"}
USER_ENV.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})


def run(argv: list[str], cwd=REPO_ROOT, **env) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S, env={**USER_ENV, **env})


def python(script: str, *args: str, **env) -> subprocess.CompletedProcess:
    return run([sys.executable, os.path.join(REPO_ROOT, script), *args], **env)


def write_yaml(tmp_path, settings: dict, name="run.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(settings))
    return str(path)


# --- 0. one command sets up a fresh machine and runs the suite; CI runs exactly it ---------------


def command_lines(path: str) -> list[str]:
    """A shell script's commands, less comments, `set` and the `cd` to the repo root."""
    with open(path) as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]


def readme_quick_start_commands() -> list[str]:
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    assert command_lines(os.path.join(REPO_ROOT, ".ci", "run")) == ["bash scripts/test.sh"]
    commands = readme_quick_start_commands()
    assert commands[:2] == [
        "pip install -r requirements.txt && torchrun --nproc_per_node=1 train.py",
        "bash scripts/test.sh",
    ]


def fake_bin(tmp_path, pytest_status: int) -> str:
    """Stand-ins for python, apt-get and sudo that log their arguments; chromium is absent."""
    folder = tmp_path / "bin"
    folder.mkdir()
    log = tmp_path / "log"
    scripts = {
        "python": f'echo "python $*" >> {log}\n[ "$1 $2" = "-m pytest" ] && exit {pytest_status}\nexit 0\n',
        "apt-get": f'echo "apt-get $*" >> {log}\n',
        "sudo": f'echo "sudo $1" >> {log}\n"$@"\n',
    }
    for name, body in scripts.items():
        path = folder / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    for tool in ("dirname", "rm"):  # the real ones: the script finds its folder, clears a status file
        os.symlink(shutil.which(tool), folder / tool)
    return str(folder)


def test_the_test_script_installs_everything_the_suite_uses_and_returns_pytests_status(tmp_path):
    folder = fake_bin(tmp_path, pytest_status=3)
    result = subprocess.run(
        ["/bin/bash", os.path.join(REPO_ROOT, "scripts", "test.sh"), "-k", "config"],
        capture_output=True, text=True, timeout=60, env={"PATH": folder, "HOME": str(tmp_path)},
    )
    assert result.returncode == 3, result.stderr  # pytest's status is the script's
    log = [line.replace("sudo ", "") for line in (tmp_path / "log").read_text().splitlines() if line != "sudo apt-get"]
    install, *apt, test = log
    assert "pip install" in install
    assert "-r requirements-dev.txt" in install and "-r requirements-deepspeed.txt" in install
    assert apt == ["apt-get update -qq", "apt-get install -y -qq chromium"]  # no chromium on PATH
    assert test == "python -m pytest -q -n auto --dist worksteal --durations=25 -k config"  # one worker per core


def requirement_names(path: str) -> set[str]:
    names = set()
    with open(os.path.join(REPO_ROOT, path)) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line.startswith("-r "):
                names |= requirement_names(line[3:].strip())
            elif line:
                names.add(re.split(r"[=<>~!\[ ]", line)[0].lower())
    return names


def test_the_test_script_installs_every_module_a_test_would_skip_without():
    installed = requirement_names("requirements-dev.txt") | requirement_names("requirements-deepspeed.txt")
    skipped_without = set()
    for name in os.listdir(os.path.join(REPO_ROOT, "tests")):
        if name.endswith(".py"):
            with open(os.path.join(REPO_ROOT, "tests", name)) as f:
                skipped_without |= set(re.findall(r"importorskip\(\s*[\"']([\w.]+)", f.read()))
    assert {m.split(".")[0] for m in skipped_without} <= installed


def test_torch_and_torchvision_are_pinned_together_and_installed_as_pinned():
    pins = {}
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as f:
        for line in f:
            match = re.match(r"(torch|torchvision)==([\w.+]+)", line.strip())
            if match:
                pins[match[1]] = match[2]
    assert set(pins) == {"torch", "torchvision"}
    for name, pinned in pins.items():
        assert version(name).split("+")[0] == pinned, name


# --- 1. --help: the project's settings, grouped, each spelling accepted ---------------------------


def shown_options(text: str) -> list[tuple[str, str, str]]:
    """(name, value word, default) of each `  --name VALUE  (default X)  help` line."""
    return re.findall(r"^  --(\w+) (\S+(?: \[\S+ \.\.\.\])?)\s+\(default (.*?)\)", text, re.M)


@pytest.mark.slow
def test_help_runs_and_lists_the_projects_settings_first_grouped():
    result = python("train.py", "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    text = result.stdout
    titles = re.findall(r"^(\S[^:\n]*):$", text, re.M)
    assert titles[:4] == ["model", "freeze and LoRA", "data", "run"]
    assert len(text.splitlines()) < 150  # not the 760 lines of every TrainingArguments setting
    assert "python train.py --help_all" in text.splitlines()[-1]
    # Only spellings the parser takes: underscores, booleans as true|false.
    assert not re.search(r"--\w+-[\w-]+", text) and "--no_" not in text
    groups = dict(re.findall(r"^(\S[^:\n]*):\n((?:  .*\n?)*)", text, re.M))
    names = {title: [n for n, _, _ in shown_options(body)] for title, body in groups.items()}
    assert "learning_rate" not in names["run"] and names["run"][0] == "output_dir"
    assert set(names["run"]) == set(inspect.get_annotations(TrainArguments))  # its own fields
    assert "freeze_llm" in names["freeze and LoRA"] and "lora_r" in names["freeze and LoRA"]
    assert "bits" in names["freeze and LoRA"] and "connector" in names["model"]
    assert "data_path" in names["data"]


def test_short_h_prints_the_same_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(["-h"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == cli_help.format_help(config.ALL_ARGUMENTS).strip()


def test_every_setting_has_a_line_and_its_true_default():
    text = cli_help.format_help(config.ALL_ARGUMENTS)
    for name, _, default in shown_options(text):
        line = next(line for line in text.splitlines() if line.startswith(f"  --{name} "))
        assert line.split(f"(default {default})", 1)[1].strip(), f"--{name} has no help line"
    defaults = {n: d for n, _, d in shown_options(cli_help.format_help(config.ALL_ARGUMENTS))}
    assert defaults["freeze_llm"] == "true" and defaults["connector"] == "mlp2x_gelu"
    assert defaults["lora_r"] == "64" and defaults["max_length"] == "2048"


def sample_value(value: str, default: str) -> list[str]:
    if value == "true|false":
        return ["false" if default == "none" else default]
    if default != "none":
        return default.split() if "..." in value else [default]
    first = value.split()[0]
    return {"N": ["1"], "X": ["0.5"]}.get(first, [first.split("|")[0] if "|" in first else "x"])


def test_every_option_the_help_shows_parses(tmp_path):
    for name, value, default in shown_options(cli_help.format_help(config.ALL_ARGUMENTS)):
        if value == "JSON|PATH":  # a file it would read; the spelling is checked below
            continue
        argv = ["--output_dir", str(tmp_path), f"--{name}", *sample_value(value, default)]
        if name == "output_dir":
            argv = argv[2:]
        try:
            parse_config(argv)  # argparse exits on a value it cannot read
        except ConfigError as error:  # read, then refused with the defaults it meets (a conflict)
            assert "Unknown setting" not in str(error), name


def test_every_option_help_all_shows_is_a_spelling_the_parser_takes(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help_all"])
    text = capsys.readouterr().out
    names = [n for n, _, _ in shown_options(text)]
    assert len(names) > 150 and "adam_beta1" in names
    known = {f.name for cls in config.ALL_ARGUMENTS for f in dataclasses.fields(cls) if f.init}
    assert cli._unknown_settings(names, known, cli.CLI) == []


# --- 2. a user's mistake: one message, exit status 2, no traceback -------------------------------


def test_every_unknown_key_is_reported_at_once(tmp_path):
    path = write_yaml(tmp_path, {"learnig_rate": 1e-3, "freeze_vti": False, "connector": "mlp2x_gelu"})
    with pytest.raises(ConfigError) as error:
        parse_config([path, "--lora_rr", "8"])
    message = str(error.value)
    for typo, fix in (("learnig_rate", "learning_rate"), ("freeze_vti", "freeze_vit"), ("lora_rr", "lora_r")):
        assert f"'{typo}'" in message and f"'{fix}'" in message
    assert path in message and "command line" in message and "--help" in message


@pytest.mark.parametrize(
    "key, fix", [("vision-model", "'vision_model'"), ("no_freeze_llm", "--freeze_llm false")]
)
def test_argparse_only_spellings_are_refused_naming_the_accepted_one(tmp_path, key, fix):
    with pytest.raises(ConfigError, match=re.escape(fix)):
        parse_config(["--output_dir", str(tmp_path), f"--{key}", *([] if key.startswith("no_") else ["x"])])


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("bad_data")
    record = {"id": 1, "image": "missing.png",
              "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]}
    (folder / "train.json").write_text(json.dumps([record]))
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    ["config-typo", "conflicting-flags", "missing-config", "bad-record", "checkpoint-refused", "infer-usage"],
)
def test_a_user_error_is_one_message_and_exit_status_2(case, tiny_base, bad_data, tmp_path):
    tiny = ["--vision_model", tiny_base["vision"], "--llm_model", tiny_base["llm"],
            "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    argv, named = {
        "config-typo": (["train.py", "configs/demo.yaml", "--learnig_rate", "1"],
                        ["Unknown setting 'learnig_rate'", "'learning_rate'"]),
        "conflicting-flags": (["train.py", "--freeze_llm", "false", "--lora_enable", "true", *tiny],
                              ["--freeze_llm false", "--lora_enable true"]),
        "missing-config": (["train.py", str(tmp_path / "nope.yaml")], ["nope.yaml: no such file"]),
        "bad-record": (["train.py", *tiny, "--freeze_llm", "false", "--data_path", os.path.join(bad_data, "train.json"),
                        "--image_folder", bad_data], ["training does not start", "missing.png"]),
        "checkpoint-refused": (["infer.py", "--checkpoint", str(tmp_path), "--prompt", "hi"],
                               ["vlm_manifest.json", str(tmp_path)]),
        "infer-usage": (["infer.py", "--checkpoint", str(tmp_path)], ["--prompt", "--data"]),
    }[case]
    result = python(*argv)
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr + result.stdout
    assert "error: " in result.stderr
    for words in named:
        assert words in result.stderr, (words, result.stderr[-2000:])
    assert "VLM_DEBUG=1" in result.stderr


@pytest.mark.slow
def test_vlm_debug_shows_the_traceback():
    result = python("train.py", "configs/demo.yaml", "--learnig_rate", "1", VLM_DEBUG="1")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_run_main_exits_2_on_user_errors_only(capsys, monkeypatch):
    monkeypatch.delenv("VLM_DEBUG", raising=False)

    def raising(error):
        def main():
            raise error
        return main

    for error, said in (
        (DataError("train.json line 3: no 'conversations'."), "error: train.json line 3"),
        (ConfigError("--bits 3: choose 16, 8 or 4."), "error: --bits 3"),
        (FileNotFoundError(2, "No such file or directory", "x.json"), "error: x.json: no such file"),
        (SystemExit("Give --image or --video, not both."), "error: Give --image"),
    ):
        with pytest.raises(SystemExit) as exit_:
            cli.run_main(raising(error))
        assert exit_.value.code == 2
        assert said in capsys.readouterr().err
    with pytest.raises(RuntimeError):  # a bug keeps its traceback
        cli.run_main(raising(RuntimeError("bug")))
    with pytest.raises(SystemExit) as exit_:  # argparse's own exit and a main's return status pass
        cli.run_main(raising(SystemExit(1)))
    assert exit_.value.code == 1
    assert cli.run_main(lambda: 1) == 1
    monkeypatch.setenv("VLM_DEBUG", "1")
    with pytest.raises(DataError):
        cli.run_main(raising(DataError("bad")))


@pytest.mark.parametrize(
    "error",
    [ConfigError("c"), DataError("d"), ImageError("i"), CheckpointError("k"), FreezeError("f"),
     TemplateMismatch("t"), SampleTooLong("s"), MarkerMismatch(2, 1)],
    ids=lambda e: type(e).__name__,
)
def test_every_kind_of_refusal_is_a_user_error(error, capsys, monkeypatch):
    monkeypatch.delenv("VLM_DEBUG", raising=False)
    assert isinstance(error, UserError)

    def main():
        raise error

    with pytest.raises(SystemExit) as exit_:
        cli.run_main(main)
    assert exit_.value.code == 2
    assert f"error: {error}" in capsys.readouterr().err


def exception_bases() -> dict[str, list[str]]:
    """{class name: its bases' names} of every exception class the repo defines (tests aside, and
    bench/: a benchmark's `PinnedInternalGone` tells a developer a library moved, not a user's mistake)."""
    import ast

    bases = {}
    for folder, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "bench", "__pycache__", "outputs")]  # .venv-vllm: not ours
        for name in (n for n in files if n.endswith(".py")):
            with open(os.path.join(folder, name)) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.bases:
                    bases[node.name] = [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in node.bases]
    return bases


def test_every_exception_the_repo_defines_subclasses_user_error():
    """A refusal about the user's input is one message and exit 2 (run_main), only if it is a
    UserError: a new `class FooError(ValueError)` would print a traceback instead."""
    bases = exception_bases()

    def is_user_error(name: str) -> bool:
        return name == "UserError" or any(is_user_error(b) for b in bases.get(name, ()))

    def is_exception(name: str) -> bool:
        return name.endswith(("Error", "Exception")) or any(is_exception(b) for b in bases.get(name, ()))

    exceptions = [name for name in bases if name != "UserError" and is_exception(name)]
    assert {"ConfigError", "CheckpointError", "PageError", "TemplateMismatch"} <= set(exceptions)
    assert [name for name in exceptions if not is_user_error(name)] == []


# --- 3. wandb without a login: offline, said before any model loads -----------------------------


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC",
                 "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, "")  # so that teardown restores it, whatever the test set
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_wandb_without_a_login_falls_back_to_offline_and_says_how_to_log_in(no_wandb_login, capsys):
    *_, train_args = parse_config([os.path.join(REPO_ROOT, "configs", "llava15_lora.yaml"),
                                   "--use_cpu", "true", "--bf16", "false"])
    assert "wandb" in train_args.report_to
    assert "WANDB_MODE" not in os.environ  # parsing reads settings; adapting to the machine is explicit
    environment.adapt_to_machine(train_args)
    assert os.environ["WANDB_MODE"] == "offline"
    said = capsys.readouterr().err
    assert "wandb login" in said and "WANDB_API_KEY" in said and "offline" in said


@pytest.mark.parametrize("login", ["api-key", "netrc", "offline-mode"])
def test_wandb_with_a_login_or_a_mode_is_left_alone(login, no_wandb_login, monkeypatch, capsys):
    if login == "api-key":
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    elif login == "netrc":
        netrc = no_wandb_login / ".netrc"
        netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
        netrc.chmod(0o600)
    else:
        monkeypatch.setenv("WANDB_MODE", "disabled")
    environment.check_logging(SimpleNamespace(report_to=["wandb"]))
    assert os.environ.get("WANDB_MODE") == ("disabled" if login == "offline-mode" else None)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_a_wandb_run_without_a_login_trains_and_logs_offline(tiny_base, demo_data, tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "configs/demo.yaml", "--vision_model", tiny_base["vision"],
         "--llm_model", tiny_base["llm"], "--data_path", demo_data["train"], "--image_folder", demo_data["image_folder"],
         "--eval_data_path", "", "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--report_to", "wandb"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S,
        env={**USER_ENV, "HOME": str(tmp_path), "WANDB_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:]
    # Said before the model is built (its freeze table is the first thing train.py prints of it).
    assert result.stdout.index("no wandb login") < result.stdout.index("component  mode")
    assert [p for p in (tmp_path / "wandb").glob("offline-run-*") if list(p.glob("*.wandb"))]


# --- 4. the launch scripts fit the machine ------------------------------------------------------


@pytest.mark.slow
def test_a_launch_script_defaults_nproc_to_the_gpus_and_stops_cleanly_on_a_user_error():
    env = {k: v for k, v in USER_ENV.items() if k != "NPROC"}
    result = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "scripts", "llava15_lora.sh"), "--learnig_rate", "1"],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
    )
    assert f"llava15_lora.yaml: {max(torch.cuda.device_count(), 1)} process(es)" in result.stdout
    assert result.returncode == 2, result.stderr[-3000:]
    # Under torchrun too: the rank's message, and no launcher traceback after it.
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert "Unknown setting 'learnig_rate'" in result.stderr


def test_no_launch_script_hard_codes_the_process_count():
    for name in os.listdir(os.path.join(REPO_ROOT, "scripts")):
        if name.endswith(".sh") and name not in ("test.sh", "vllm_env.sh"):  # those two launch no training
            with open(os.path.join(REPO_ROOT, "scripts", name)) as f:
                text = f.read()
            delegate = re.search(r'\bbash ".*?/(\w+\.sh)"', text)  # a recipe over a shared launcher
            if delegate:
                with open(os.path.join(REPO_ROOT, "scripts", delegate[1])) as f:
                    text = f.read()
            assert re.search(r"NPROC=\$\{NPROC:-\$\(python -c .*torch\.cuda\.device_count\(\)", text), name
            assert "--nproc_per_node=\"$NPROC\"" in text and "--nproc_per_node=8" not in text, name


@pytest.mark.parametrize(
    "cores, local_ranks, asked, expected",
    [(2, 1, 4, 1), (8, 2, 4, 3), (1, 1, 4, 0), (96, 8, 4, 4), (2, 1, 0, 0)],
)
def test_dataloader_workers_never_exceed_the_free_cores(cores, local_ranks, asked, expected, monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    argv = ["--output_dir", str(tmp_path), "--dataloader_num_workers", str(asked)]
    if asked:
        argv += ["--dataloader_prefetch_factor", "2", "--dataloader_persistent_workers", "true"]
    *_, train_args = parse_config(argv)
    assert train_args.dataloader_num_workers == asked  # parsing reads settings; adapting is explicit
    environment.adapt_to_machine(train_args)
    assert train_args.dataloader_num_workers == expected
    if expected == 0 and asked:  # the DataLoader refuses worker options without a worker
        assert train_args.dataloader_prefetch_factor is None and not train_args.dataloader_persistent_workers


def test_a_recipes_workers_fit_this_machine(monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    *_, train_args = parse_config([os.path.join(REPO_ROOT, "configs", "llava15_finetune.yaml"),
                                   "--use_cpu", "true", "--bf16", "false", "--report_to", "none"])
    environment.adapt_to_machine(train_args)
    assert train_args.dataloader_num_workers == 1
    assert "dataloader_num_workers 4 -> 1" in capsys.readouterr().err


def test_a_process_killed_by_a_signal_says_where_each_thread_was():
    """startup (imported first by every entry point) enables faulthandler: a rank aborted by a
    library's C++ thread prints its Python stacks, where torchrun alone says only "Signal 6"."""
    code = "import startup, os\ndef last_words():\n    os.abort()\nlast_words()\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode != 0 and "Fatal Python error: Aborted" in result.stderr, result.stderr
    assert "in last_words" in result.stderr, result.stderr
