"""config.py: YAML + command line (command line wins), unknown keys, booleans, every shipped
config, the resolved config, and the flag combinations refused before any model loads."""

from __future__ import annotations

import dataclasses
import glob
import os

import pytest
import torch
import yaml

from config import (
    DEFAULT_LLM,
    ConfigError,
    ModelArguments,
    config_dict,
    parse_config,
    save_resolved_config,
)

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
    path = write_yaml(tmp_path, {"freeze_vit": value, "build_tiny_base_if_missing": value})
    model_args, _, _ = parse_config([path])
    assert model_args.freeze_vit is value
    assert model_args.build_tiny_base_if_missing is value


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
