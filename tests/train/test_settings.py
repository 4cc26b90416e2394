"""Settings of the training command: field docs, typed values, --list-settings and the flag convention."""

import dataclasses

import pytest

from ditmoe.model import DiTConfig
from ditmoe.settings import check_value, field_docs, format_value, parse_value
from ditmoe.train.__main__ import build_parser, main
from ditmoe.train.config import TrainConfig, resolve_config


@pytest.mark.parametrize("cls", [TrainConfig, DiTConfig])
def test_every_field_has_a_one_line_doc(cls):
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        assert docs.get(field.name), f"{cls.__name__}.{field.name} has no doc"
        assert "\n" not in docs[field.name], f"{cls.__name__}.{field.name}: doc is not one line"


@pytest.mark.parametrize("value", [3, 0.001, 1e-05, float("inf"), True, False, "a b", "x=y"])
def test_format_value_parses_back(value):
    assert parse_value(format_value(value), value) == value


def test_check_value_types():
    assert check_value(2, float) == 2.0 and isinstance(check_value(2, float), float)
    assert check_value("1e-4", float) == 1e-4  # YAML reads 1e-4 (no dot) as a string
    assert check_value(None, str | None) is None
    assert check_value("auto", str | None) == "auto"
    for value, kind in [(True, int), ("3", int), (1, bool), (3, str), (None, int), ("x", float)]:
        with pytest.raises(ValueError, match="expected"):
            check_value(value, kind)


def test_list_settings_prints_every_key_with_preset_defaults(capsys):
    main(["--preset", "tiny", "--list-settings"])
    lines = capsys.readouterr().out.splitlines()
    assert "preset 'tiny'" in lines[0]
    keys = [line.split()[0] for line in lines[1:]]
    train_keys = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "model_overrides"]
    assert keys == train_keys + [f"model.{f.name}" for f in dataclasses.fields(DiTConfig)]
    depth = next(line for line in lines if line.split()[0] == "model.depth")
    assert depth.split()[1:3] == ["int", "2"] and field_docs(DiTConfig)["depth"] in depth


def test_every_flag_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--config", "--list-settings", "--activation-checkpointing", "--steps", "--set"]:
        assert flag in text


def test_usage_error_exits_2_naming_the_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--activation-checkpointing", "two"])
    assert exit_info.value.code == 2
    assert "--activation-checkpointing" in capsys.readouterr().err


def test_bad_setting_is_a_usage_error_naming_it(capsys):
    for argv, message in [(["--set", "learning_rate=1"], "unknown training config key 'learning_rate'"),
                          (["--set", "model.top_k=9"], "top_k=9 must be between 1 and num_experts=4"),
                          (["--preset", "DiT-MoE-Q/2"], "unknown preset 'DiT-MoE-Q/2'")]:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--list-settings"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_activation_checkpointing_flag_and_old_aliases():
    args = build_parser().parse_args(["--activation-checkpointing", "2", "--local_rank=1"])
    assert args.activation_checkpointing == 2 and args.local_rank == 1
    config = resolve_config(None, {"activation_checkpointing": 2}, [])
    assert config.activation_checkpointing == 2


def test_model_overrides_are_recorded_once_per_key():
    config = resolve_config(None, {}, ["model.mlp_ratio=3", "model.depth=3", "model.mlp_ratio=2"])
    assert config.model_overrides == ("mlp_ratio=2.0", "depth=3")
    assert config.model_config().mlp_ratio == 2.0
