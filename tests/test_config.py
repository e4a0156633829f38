"""The settings: YAML + command line (command line wins, cli.parse_config), unknown keys, booleans,
every shipped config, the resolved config, the flag combinations refused before any model loads
(model/settings.py), the machine's part (use_cpu), and the demo's assets, which are no setting."""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import pytest
import torch
import yaml

from cli import parse_config
from config import DataArguments, TrainArguments, config_dict, save_resolved_config
from errors import ConfigError
from fixtures import demo_assets
from model.settings import DEFAULT_LLM, ModelArguments
from run.checkpoint import FORMAT_VERSION, MANIFEST, checkpoint_model_args

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every training config; configs/shapes/ holds model shapes for bench/training.py and --dry_run, not runs.
SHIPPED_CONFIGS = sorted(
    path
    for pattern in ("*.yaml", "*.yml")
    for path in glob.glob(os.path.join(REPO_ROOT, "configs", "**", pattern), recursive=True)
    if os.sep + "shapes" + os.sep not in path
)


def write_yaml(tmp_path, settings: dict, name="run.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def test_yaml_values_are_applied_and_the_command_line_wins(tmp_path):
    path = write_yaml(
        tmp_path,
        {
            "connector": "resampler",
            "resampler_num_queries": 16,
            "freeze_llm": False,
            "learning_rate": 1.0e-3,
            "max_length": 128,
            "output_dir": str(tmp_path / "from-yaml"),
        },
    )
    model_args, data_args, train_args = parse_config(
        [path, "--learning_rate", "5e-4", "--max_length=64", "--output_dir", str(tmp_path / "cli")]
    )
    # From the YAML, untouched by the command line.
    assert model_args.connector == "resampler"
    assert model_args.resampler_num_queries == 16
    assert model_args.freeze_llm is False
    # Given in both places: the command line wins (both `--key value` and `--key=value`).
    assert train_args.learning_rate == pytest.approx(5e-4)
    assert data_args.max_length == 64
    assert train_args.output_dir == str(tmp_path / "cli")
    # Given nowhere: the dataclass default.
    assert model_args.vision_feature_layer == -2


def test_no_arguments_means_the_demo_config():
    model_args, data_args, train_args = parse_config([])
    with open(os.path.join(REPO_ROOT, "configs", "demo.yaml")) as f:
        demo = yaml.safe_load(f)
    assert model_args.llm_model == demo["llm_model"]
    assert data_args.data_path == demo["data_path"]
    assert train_args.output_dir == demo["output_dir"]


def test_command_line_without_yaml_uses_defaults_not_the_demo(tmp_path):
    model_args, _, train_args = parse_config(["--output_dir", str(tmp_path), "--lora_r", "8"])
    assert model_args.lora_r == 8
    assert model_args.llm_model == DEFAULT_LLM  # the composed default (LLaVA-1.5), not demo.yaml's
    assert train_args.output_dir == str(tmp_path)


def test_unknown_yaml_key_names_the_key_and_the_closest_valid_one(tmp_path):
    path = write_yaml(tmp_path, {"learnig_rate": 1e-3, "connector": "mlp2x_gelu"})
    with pytest.raises(ConfigError) as error:
        parse_config([path])
    message = str(error.value)
    assert "'learnig_rate'" in message
    assert "'learning_rate'" in message
    assert path in message  # says where the bad key is


@pytest.mark.parametrize(
    "argv, key, suggestion",
    [
        (["--learnig_rate", "1e-4"], "learnig_rate", "learning_rate"),
        (["--learnig_rate=1e-4"], "learnig_rate", "learning_rate"),
        (["--freeze_vti", "false"], "freeze_vti", "freeze_vit"),
    ],
)
def test_unknown_command_line_key_names_the_key_and_the_closest_valid_one(tmp_path, argv, key, suggestion):
    path = write_yaml(tmp_path, {"connector": "mlp2x_gelu"})
    with pytest.raises(ConfigError) as error:
        parse_config([path, *argv])
    message = str(error.value)
    assert f"'{key}'" in message
    assert f"'{suggestion}'" in message
    assert "command line" in message


@pytest.mark.parametrize("word, value", [("true", True), ("false", False)])
def test_booleans_take_true_and_false_on_the_command_line(tmp_path, word, value):
    # The YAML says the opposite, so the value can only come from the command-line word.
    path = write_yaml(tmp_path, {"freeze_vit": not value, "double_quant": not value})
    model_args, _, _ = parse_config([path, "--freeze_vit", word, "--double_quant", word])
    assert model_args.freeze_vit is value
    assert model_args.double_quant is value


@pytest.mark.parametrize("value", [True, False])
def test_booleans_in_yaml(tmp_path, value):
    path = write_yaml(tmp_path, {"freeze_vit": value, "fused_loss": value})
    model_args, _, _ = parse_config([path])
    assert model_args.freeze_vit is value
    assert model_args.fused_loss is value


def test_a_boolean_that_is_not_one_is_refused(tmp_path):
    path = write_yaml(tmp_path, {"connector": "mlp2x_gelu"})
    with pytest.raises(SystemExit):  # argparse: "Truthy value expected"
        parse_config([path, "--freeze_vit", "maybe"])


def test_shipped_configs_are_found():
    assert os.path.join(REPO_ROOT, "configs", "demo.yaml") in SHIPPED_CONFIGS


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_every_shipped_config_parses(path):
    # Recipes ask for bf16 on GPUs; TrainingArguments refuses bf16 on a machine without one
    # unless told it runs on the CPU. That is a check of the machine, not of the config.
    hardware = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    model_args, data_args, train_args = parse_config([path, *hardware])
    with open(path) as f:
        settings = yaml.safe_load(f) or {}
    # Every model / data setting in the file reached the dataclasses as written.
    for args in (model_args, data_args):
        for field in dataclasses.fields(args):
            if field.name in settings:
                assert getattr(args, field.name) == settings[field.name], (path, field.name)
    if "output_dir" in settings:
        assert train_args.output_dir == settings["output_dir"]
    if data_args.chat_template:  # relative to the repo root, where the scripts run
        assert os.path.isfile(os.path.join(REPO_ROOT, data_args.chat_template)), data_args.chat_template


def test_resolved_config_parses_back_to_the_same_arguments(tmp_path):
    args = parse_config(
        [
            os.path.join(REPO_ROOT, "configs", "demo.yaml"),
            "--output_dir", str(tmp_path / "run"),
            "--connector", "resampler",
            "--lora_modules", "q_proj", "v_proj",
            "--learning_rate", "3e-4",
            "--vision_lr", "1e-5",
        ]
    )
    path = str(tmp_path / "run" / "config.yaml")
    save_resolved_config(path, *args)

    with open(path) as f:
        saved = yaml.safe_load(f)
    assert saved == yaml.safe_load(yaml.safe_dump(config_dict(*args), sort_keys=False))
    assert saved["model"]["connector"] == "resampler"
    assert saved["model"]["lora_modules"] == ["q_proj", "v_proj"]
    assert saved["train"]["learning_rate"] == pytest.approx(3e-4)

    # The sections, flattened into one YAML, relaunch exactly the same run.
    flat = write_yaml(tmp_path, {**saved["model"], **saved["data"], **saved["train"]}, "flat.yaml")
    model_args, data_args, train_args = parse_config([flat])
    assert model_args == args[0]
    assert data_args == args[1]
    assert train_args.to_dict() == args[2].to_dict()


def test_empty_list_in_yaml_means_the_default(tmp_path):
    path = write_yaml(tmp_path, {"lora_modules": [], "trainable_regex": [], "report_to": []})
    model_args, _, _ = parse_config([path])
    assert model_args.lora_modules is None
    assert model_args.trainable_regex is None


@pytest.mark.parametrize(
    "argv, named",
    [
        pytest.param(
            ["--freeze_llm", "false", "--lora_enable", "true"],
            ["--freeze_llm false", "--lora_enable true"],
            id="full-llm-and-llm-lora",
        ),
        pytest.param(
            ["--freeze_llm", "false", "--lora_enable", "true", "--lora_target", "both"],
            ["--freeze_llm false", "--lora_enable true", "--lora_target"],
            id="full-llm-and-both-lora",
        ),
        pytest.param(
            ["--bits", "4", "--freeze_llm", "false"],
            ["--bits 4", "--freeze_llm false"],
            id="4bit-and-full-llm",
        ),
        pytest.param(
            ["--freeze_lora", "true"],
            ["--freeze_lora true", "--lora_enable"],
            id="freeze-lora-without-lora",
        ),
        pytest.param(
            ["--freeze_qformer", "true"],
            ["Nothing left to train", "--freeze_vit", "--freeze_qformer", "--freeze_llm"],
            id="nothing-trains",
        ),
        pytest.param(
            ["--freeze_qformer", "true", "--lora_enable", "true", "--freeze_lora", "true"],
            ["Nothing left to train", "--freeze_lora"],
            id="nothing-trains-frozen-lora",
        ),
        pytest.param(
            ["--lora_enable", "true", "--lora_target", "vit", "--freeze_vit", "false"],
            ["--lora_target vit", "--freeze_vit false"],
            id="vit-lora-and-full-vit",
        ),
    ],
)
def test_conflicting_flags_are_refused_naming_the_flags(tmp_path, argv, named):
    with pytest.raises(ConfigError) as error:
        parse_config(["--output_dir", str(tmp_path), *argv])
    for words in named:
        assert words in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"freeze_qformer": True, "lora_enable": True}, id="llm-lora-only"),
        pytest.param({"freeze_qformer": True, "trainable_regex": ["^connector"]}, id="regex-only"),
        pytest.param({"freeze_llm": False, "lora_enable": True, "lora_target": "vit"}, id="full-llm-vit-lora"),
        pytest.param({"bits": 4, "lora_enable": True}, id="qlora"),
        pytest.param({"lora_enable": True, "freeze_lora": True}, id="frozen-lora-trainable-connector"),
    ],
)
def test_meaningful_combinations_are_accepted(overrides):
    args = ModelArguments(**overrides)
    for key, value in overrides.items():
        assert getattr(args, key) == value


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"connector": "qformer"}, "--connector"),
        ({"lora_target": "all"}, "--lora_target"),
        ({"bits": 2}, "--bits"),
        ({"vision_feature_select_strategy": "cls"}, "--vision_feature_select_strategy"),
        ({"dtype": "float64"}, "--dtype"),
    ],
)
def test_invalid_choices_are_refused(overrides, named):
    with pytest.raises(ConfigError, match=named):
        ModelArguments(**overrides)


# --- the machine's part: decided where accelerate's device state is built ------------------------


def test_use_cpu_defaults_to_the_cpu_on_a_machine_without_a_gpu(tmp_path):
    args = TrainArguments(output_dir=str(tmp_path), report_to="none")
    no_gpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    assert args.use_cpu is no_gpu
    # In place before TrainingArguments built accelerate's state, which read it once.
    assert args.distributed_state.device.type == ("cpu" if no_gpu else args.device.type)
    assert args.dataloader_pin_memory is not no_gpu  # transformers' own use_cpu consequence
    assert TrainArguments(output_dir=str(tmp_path), report_to="none", use_cpu=False).use_cpu is False


def test_use_cpu_stays_off_under_deepspeed(tmp_path):
    pytest.importorskip("deepspeed")
    # Without a GPU, use_cpu would take _setup_devices' CPU branch and bypass DeepSpeed.
    zero2 = os.path.join(REPO_ROOT, "configs", "deepspeed", "zero2.json")
    args = TrainArguments(output_dir=str(tmp_path), report_to="none", deepspeed=zero2)
    assert args.use_cpu is False


def test_parsing_adapts_nothing_to_the_machine(tmp_path, monkeypatch, capsys):
    # Worker capping and wandb are run.environment.adapt_to_machine's (train.py calls it).
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    *_, train_args = parse_config(["--output_dir", str(tmp_path), "--dataloader_num_workers", "4"])
    assert train_args.dataloader_num_workers == 4
    assert capsys.readouterr().err == ""


# --- the demo's assets: made by train.py where the demo names them, no setting of the schema ------


@pytest.fixture
def demo_config(tmp_path, monkeypatch) -> dict:
    """A demo config naming paths under tmp_path, and builders that only record their calls."""
    settings = {"vision_model": str(tmp_path / "base" / "vision"), "llm_model": str(tmp_path / "base" / "llm"),
                "data_path": str(tmp_path / "data" / "train.json")}
    monkeypatch.setattr(demo_assets, "DEMO_CONFIG", write_yaml(tmp_path, settings, "demo.yaml"))
    made = []
    monkeypatch.setattr(demo_assets, "make_tiny_base", lambda out, corpus, seed: made.append(("base", out, seed)))
    monkeypatch.setattr(demo_assets, "make_demo_dataset", lambda out, train, eval_: made.append(("data", out, train, eval_)))
    return {"settings": settings, "made": made, "root": tmp_path}


def test_a_run_naming_the_demos_paths_gets_its_assets_made_once(demo_config):
    settings, made, root = demo_config["settings"], demo_config["made"], demo_config["root"]
    model_args = ModelArguments(vision_model=settings["vision_model"], llm_model=settings["llm_model"])
    data_args = DataArguments(data_path=settings["data_path"])
    demo_assets.make_missing_demo_assets(model_args, data_args)
    assert made == [("base", str(root / "base"), 0),
                    ("data", str(root / "data"), demo_assets.DEMO_TRAIN_RECORDS, demo_assets.DEMO_EVAL_RECORDS)]
    for folder in ("base/vision", "base/llm", "data"):
        (root / folder).mkdir(parents=True)
    (root / "data" / "train.json").write_text("[]")
    made.clear()
    demo_assets.make_missing_demo_assets(model_args, data_args)  # present: nothing is rebuilt
    assert made == []


def test_a_run_naming_its_own_base_and_data_builds_nothing(demo_config, tmp_path):
    model_args = ModelArguments(vision_model=str(tmp_path / "v"), llm_model=str(tmp_path / "l"))
    demo_assets.make_missing_demo_assets(model_args, DataArguments(data_path=str(tmp_path / "mine.json")))
    assert demo_config["made"] == []


def test_the_shipped_demo_config_names_paths_the_builders_write():
    demo = demo_assets.demo_settings()
    assert os.path.dirname(demo["vision_model"]) == os.path.dirname(demo["llm_model"])  # make_tiny_base's two
    assert os.path.basename(demo["vision_model"]) == "vision" and os.path.basename(demo["llm_model"]) == "llm"
    assert demo["eval_data_path"] == os.path.join(os.path.dirname(demo["data_path"]), "eval.json")
    assert os.path.basename(demo["data_path"]) == "train.json"


def test_the_schema_holds_no_demo_knob_and_old_manifests_still_load(tmp_path):
    names = {f.name for cls in (ModelArguments, DataArguments) for f in dataclasses.fields(cls)}
    assert not {n for n in names if "demo" in n or n.endswith("_if_missing")}
    # A manifest written while the schema had them: the loader reads the fields it knows.
    stored = {**dataclasses.asdict(ModelArguments(vision_model="v", llm_model="l")), "build_tiny_base_if_missing": True}
    (tmp_path / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "model_args": stored}))
    assert checkpoint_model_args(str(tmp_path)) == ModelArguments(vision_model="v", llm_model="l")
