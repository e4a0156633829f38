"""The command line: settings in, and a user's mistake out as one message and exit status 2.

    model_args, data_args, train_args = parse_config()    # [config.yaml] [--key value ...]

    if __name__ == "__main__":
        run_main(main)          # train.py, infer.py, scripts/*.py

    python cli.py torchrun --nproc_per_node=N train.py ...   # torchrun, as scripts/*.sh launch it

`parse_config` reads a YAML file and the command line (which wins) into config.py's dataclasses,
naming the closest valid setting for every unknown one; `-h`/`--help` prints cli_help.py's list.
A user error is an exception the pipeline raises about what it was given: every `errors.UserError`
(a setting, a record, an image, a checkpoint, a freeze policy, a chat template), a path that does
not exist (FileNotFoundError, or a model path or hub id that transformers cannot find), or a
`SystemExit("message")`. Each message already names what is wrong and the fix; it is printed as
`error: <message>`. Anything else is a bug and keeps its traceback. `VLM_DEBUG=1` shows the
traceback of user errors too.

This module imports nothing heavy at the top: `python cli.py torchrun` is the launcher, and the
settings' modules (torch, transformers: ~1 GB resident) belong to the ranks it starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
import sys
from collections.abc import Callable

import yaml

from cli_help import HELP_ALL, format_help, prog
from constants import DEMO_CONFIG
from errors import ConfigError, UserError

USER_ERROR_EXIT = 2  # argparse's status for a bad command line, so one status for every user error
DEBUG_VARIABLE = "VLM_DEBUG"
CLI = "the command line"


# --- settings in: YAML + the command line -> (ModelArguments, DataArguments, TrainArguments) -----


def parse_config(argv: list[str] | None = None, default_yaml: str | None = DEMO_CONFIG):
    """`[config.yaml] [--key value ...]` -> (ModelArguments, DataArguments, TrainArguments).

    YAML values become command-line words placed before the real ones, so the command line
    wins. With no words at all the demo config is used. `-h`/`--help` prints the settings
    (`--help_all`: transformers' too) and exits.
    """
    from transformers import HfArgumentParser  # as config: the ranks' imports, not the launcher's

    from config import ALL_ARGUMENTS, check_evaluation, check_packing

    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help", HELP_ALL} & set(argv):
        print(format_help(ALL_ARGUMENTS, everything=HELP_ALL in argv))
        raise SystemExit(0)
    yaml_path = argv.pop(0) if argv and argv[0].endswith((".yaml", ".yml")) else None
    if yaml_path is None and not argv:
        yaml_path = default_yaml

    parser = HfArgumentParser(ALL_ARGUMENTS, allow_abbrev=False)
    parser.error = _refuse_bad_value
    known = {f.name for cls in ALL_ARGUMENTS for f in dataclasses.fields(cls) if f.init}

    words: list[str] = []
    unknown: list[str] = []
    if yaml_path:
        settings = read_yaml(yaml_path)
        unknown += _unknown_settings(settings, known, yaml_path)
        for key, value in settings.items():
            words += _as_cli(key, value)
    unknown += _unknown_settings([w[2:].split("=")[0] for w in argv if w.startswith("--")], known, CLI)
    if unknown:  # every one at once, not one per launch
        listed = f"Unknown setting {unknown[0]}" if len(unknown) == 1 else "\n  ".join(["Unknown settings:", *unknown])
        raise ConfigError(f"{listed}\nFix the spelling; `python {prog()} --help` lists every setting.")
    model_args, data_args, train_args, rest = parser.parse_args_into_dataclasses(
        args=words + argv, return_remaining_strings=True
    )
    if rest:
        raise ConfigError(f"Unexpected command-line words {rest}: settings are --key value.")
    check_evaluation(data_args, train_args)
    check_packing(data_args, train_args)
    return model_args, data_args, train_args


def read_yaml(path: str) -> dict:
    """A config file's settings, `{name: value}`; a missing or malformed file is a ConfigError."""
    try:
        with open(path) as f:
            settings = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file. Give the path of a YAML config (the recipes are in configs/), "
            "or none for the demo."
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: a config is a mapping of settings (`key: value` lines), not {type(settings).__name__}.")
    return settings


def _as_cli(key: str, value) -> list[str]:
    """One YAML entry as the command-line words HfArgumentParser reads."""
    if value is None:
        return []
    if isinstance(value, bool):
        return [f"--{key}", "true" if value else "false"]
    if isinstance(value, (list, tuple)):
        # An empty list means the default: `--key` with no values is an argparse error.
        return [f"--{key}", *map(str, value)] if value else []
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value)]
    return [f"--{key}", str(value)]


def _unknown_settings(keys, known: set[str], where: str) -> list[str]:
    """One line per key that is no setting, naming the closest valid one."""
    lines = []
    for key in keys:
        if key in known:
            continue
        if key.replace("-", "_") in known:  # argparse's dashed alias: one spelling here
            hint = f"did you mean {key.replace('-', '_')!r}? Settings are spelled with underscores."
        elif key.startswith(("no_", "no-")) and key[3:].replace("-", "_") in known:
            name = key[3:].replace("-", "_")
            hint = f"did you mean {name!r} set to false ({'--' + name + ' false' if where == CLI else name + ': false'})?"
        else:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "no setting is close to it."
        lines.append(f"{key!r} {'on' if where == CLI else 'in'} {where}: {hint}")
    return lines


def _refuse_bad_value(message: str):
    """argparse's error for a value it cannot read: its exit (status 2), with one line instead of
    the usage of 200 options, and the setting named as it is spelled here."""
    message = re.sub(r"argument (--\w+)(?:/-{1,2}[\w-]+)*", r"\1", message).rstrip(". ")
    print(f"error: {message}. `python {prog()} --help` shows each setting and its values.", file=sys.stderr)
    raise SystemExit(2)


# --- a user's mistake out: one message, exit status 2 -------------------------------------------


def raised_by_hub(error: BaseException) -> bool:
    """An OSError of transformers' or huggingface_hub's file lookup: a model path or hub id given
    in the settings that is neither a local folder nor reachable on the Hub."""
    if not isinstance(error, OSError):
        return False
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return module.startswith(("transformers.utils.hub", "huggingface_hub"))


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, (UserError, FileNotFoundError)) or raised_by_hub(error)


def describe(error: BaseException) -> str:
    """The message a user error is printed with."""
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"{error.filename}: no such file or folder. Check the path (relative to {os.getcwd()})."
    if raised_by_hub(error):
        return (f"{str(error).strip()}\nCheck the model's local path or hub id (--vision_model, --llm_model, "
                "--vlm_model, or the checkpoint's manifest), and the network or HF_HUB_OFFLINE.")
    return str(error).strip() or type(error).__name__


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").lower() not in ("", "0", "false", "no")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    print(f"(a traceback for debugging: rerun with {DEBUG_VARIABLE}=1)", file=sys.stderr)
    sys.stderr.flush()
    raise SystemExit(USER_ERROR_EXIT)


def run_main(main: Callable[[], object]) -> object:
    """Call `main()` and return what it returns; a user error exits with status 2 and one message."""
    try:
        return main()
    except SystemExit as e:
        if isinstance(e.code, str) and not debugging():  # SystemExit("message"): a refusal
            fail(e.code)
        raise
    except Exception as e:
        if debugging() or not is_user_error(e):
            raise
        fail(describe(e))


def torchrun(argv: list[str]) -> None:
    """`torchrun ARGS`, except that when a rank ended on a user error (exit status 2, its message
    already printed) the launcher adds no ChildFailedError traceback of its own and exits 2."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    if not debugging():
        # Its "failed (exitcode: N)" line: a real failure's ChildFailedError report below says it too.
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        torchrun_main(argv)
    except ChildFailedError as e:
        _, first = e.get_first_failure()  # the root cause: the others are stopped because of it
        if first.exitcode != USER_ERROR_EXIT or debugging():
            raise
        raise SystemExit(USER_ERROR_EXIT) from None


if __name__ == "__main__":
    if sys.argv[1:2] != ["torchrun"]:
        raise SystemExit("usage: python cli.py torchrun [torchrun arguments] SCRIPT [arguments]")
    torchrun(sys.argv[2:])
