"""The machine a run lands on: DataLoader workers within the free cores, and wandb without a login.

`adapt_to_machine(train_args)` is the one call, made by train.py after the settings are parsed and
before any model loads; it may lower a setting and say so (a `note:` on stderr, rank 0). Whether a
run trains on the CPU is not decided here: accelerate's device state is built while the settings
are (`config.TrainArguments.use_cpu`).
"""

from __future__ import annotations

import configparser
import netrc
import os
import sys
from urllib.parse import urlparse


def adapt_to_machine(train_args) -> None:
    """Fit the parsed settings to this machine: DataLoader workers within its free cores, and wandb
    offline without a login."""
    cap_dataloader_workers(train_args)  # a recipe's 4 workers on a 2-core machine starve the step
    check_logging(train_args)


def _is_first_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def free_cores() -> int:
    """Cores this process may use for DataLoader workers: its share of the machine's (the cores
    it may run on, split between this node's ranks), less the one that runs the training step."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    ranks = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(cores // ranks - 1, 0)


def cap_dataloader_workers(args) -> None:
    """More DataLoader workers than free cores only take cores from the training step."""
    free = free_cores()
    if args.dataloader_num_workers <= free:
        return
    if _is_first_rank():
        print(
            f"note: dataloader_num_workers {args.dataloader_num_workers} -> {free}: this machine has "
            f"{free} core(s) free per process besides the training step's.",
            file=sys.stderr,
        )
    args.dataloader_num_workers = free
    if free == 0:  # options of worker processes only; the DataLoader refuses them without one
        args.dataloader_prefetch_factor = None
        args.dataloader_persistent_workers = False


WANDB_NO_LOGIN_MODES = ("offline", "disabled", "dryrun")


def _wandb_settings() -> dict[str, str]:
    """wandb's own settings files (`wandb offline` and `wandb login` may write them): global, then
    this folder's."""
    config_dir = os.environ.get("WANDB_CONFIG_DIR") or os.path.expanduser(os.path.join("~", ".config", "wandb"))
    parser = configparser.ConfigParser()
    try:
        parser.read([os.path.join(config_dir, "settings"), os.path.join("wandb", "settings")])
    except configparser.Error:
        return {}
    return dict(parser["default"]) if parser.has_section("default") else {}


def wandb_login_found() -> bool:
    """Whether wandb.init would find credentials, read as wandb reads them, without the network:
    WANDB_API_KEY (or an identity token), the .netrc entry `wandb login` writes, or its settings."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    if os.environ.get("NETRC"):
        paths = [os.path.expanduser(os.environ["NETRC"])]
    else:
        paths = [os.path.expanduser(os.path.join("~", name)) for name in (".netrc", "_netrc")]
    for path in paths:
        try:
            if os.path.isfile(path) and netrc.netrc(path).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return bool(_wandb_settings().get("api_key"))


def check_logging(train_args) -> None:
    """Before any model loads: a run that reports to wandb without a login would die in
    wandb.init, after the model is built and the data checked. Log offline instead, and say so."""
    if "wandb" not in (train_args.report_to or []):
        return
    mode = os.environ.get("WANDB_MODE") or _wandb_settings().get("mode", "")
    if mode.lower() in WANDB_NO_LOGIN_MODES or wandb_login_found():
        return
    os.environ["WANDB_MODE"] = "offline"
    if _is_first_rank():
        print(
            "note: report_to wandb, but no wandb login (no WANDB_API_KEY, no api.wandb.ai entry in ~/.netrc): "
            "logging offline to ./wandb (WANDB_MODE=offline); upload it later with `wandb sync --sync-all`. "
            "To log online, run `wandb login` or set WANDB_API_KEY; --report_to none logs nowhere.",
            file=sys.stderr,
        )


