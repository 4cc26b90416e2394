"""Experiment files (--config FILE): precedence, errors, and the resolved file that repeats a run."""

import json
import tomllib

import pytest
import yaml

from ditmoe.train.__main__ import main
from ditmoe.train.config import resolve_config, write_run_config

from conftest import SMALL_DIGITS, run_cli

FLAGS = {"steps": 3, "seed": 4, "deepspeed_config": None}
SETS = ["lr=3e-3", "model.mlp_ratio=2", "model.depth=3", "model.routing=expert_choice", "model.qk_norm=true"]


@pytest.mark.parametrize("fmt", ["toml", "yaml"])
def test_round_trip(tmp_path, fmt):
    config = resolve_config(None, FLAGS, [*SETS, f"config_format={fmt}", "resume=auto"])
    write_run_config(config, tmp_path)
    again = resolve_config(str(tmp_path / f"config.{fmt}"), {}, [])
    assert again == config and again.model_config() == config.model_config()
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == json.loads(json.dumps({"train": config.to_dict(), "model": config.model_config().to_dict()}))


def test_none_is_left_out_of_the_written_file(tmp_path):
    write_run_config(resolve_config(None, {}, []), tmp_path)
    data = tomllib.loads((tmp_path / "config.toml").read_text())
    assert "resume" not in data and "deepspeed_config" not in data and data["model"] == {}


def test_precedence_preset_file_flags_set(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"steps": 7, "lr": 0.5, "model": {"depth": 3, "hidden_size": 48}}))
    config = resolve_config(str(path), {"steps": 9, "seed": None}, ["model.depth=5"])
    model = config.model_config()
    assert (config.steps, config.lr, config.seed, config.global_batch_size) == (9, 0.5, 0, 128)  # 128: demo
    assert (model.depth, model.hidden_size, model.num_heads) == (5, 48, 4)
    assert config.config_format == "yaml"


def test_preset_from_file_and_from_flag(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('preset = "tiny"\n')
    assert resolve_config(str(path), {}, []).out == "runs/tiny"  # the generic defaults of a model preset
    config = resolve_config(str(path), {"preset": "demo"}, [])
    assert config.preset == "demo" and config.out == "runs/demo"


@pytest.mark.parametrize("name, text, message", [
    ("a.toml", "learning_rate = 1\n", "a.toml: unknown training setting 'learning_rate'"),
    ("a.toml", "[model]\ndepht = 3\n", "a.toml: unknown model setting 'depht'"),
    ("a.toml", 'steps = "ten"\n', "a.toml: training setting 'steps': expected int, got 'ten'"),
    ("a.yaml", "model:\n  qk_norm: 1\n", "a.yaml: model setting 'qk_norm': expected bool, got 1"),
    ("a.yaml", "model: 3\n", "a.yaml: 'model' must be a table"),
    ("a.yaml", "- steps\n", "a.yaml: expected a mapping"),
    ("a.toml", "model_overrides = []\n", "a.toml: unknown training setting 'model_overrides'"),
    ("a.toml", "steps = \n", "a.toml: invalid TOML"),
    ("a.json", "{}", "a.json: unknown config file extension '.json'"),
    ("a.toml", 'preset = "nope"\n', "a.toml: unknown preset 'nope'"),
    ("a.yaml", "steps: 3\nlr: 0.1\nsteps: 4\n", "a.yaml: invalid YAML: duplicate key 'steps'"),
    ("a.yaml", "model:\n  depth: 2\n  depth: 3\n", "a.yaml: invalid YAML: duplicate key 'depth'"),
])
def test_file_errors_name_file_and_key(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        resolve_config(str(tmp_path / name), {}, [])


def alias_bomb(depth: int) -> str:
    """``steps: [&a0 [...], &a1 [*a0, ...], ...]``: 9**depth elements once expanded."""
    lines = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, depth)]
    return "\n".join(lines) + f"\nsteps: *a{depth - 1}\n"


@pytest.mark.parametrize("text, message", [
    (alias_bomb(10), r"a.yaml: line 1: YAML anchors and aliases \(&, \*\) are not allowed in settings"),
    ("steps: [" + ", ".join(["1"] * 5000) + "]\n",
     r"a.yaml: training setting 'steps': expected int, got \[1, 1, .{180,}\.\.\. \(15000 characters\)$"),
], ids=["alias-bomb", "long-value"])
def test_huge_values_are_refused_before_they_are_built_or_printed(tmp_path, text, message):
    (tmp_path / "a.yaml").write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        resolve_config(str(tmp_path / "a.yaml"), {}, [])
    assert len(str(err.value)) < 400


def test_a_config_file_that_is_not_utf8_names_the_file(tmp_path):
    (tmp_path / "a.toml").write_bytes(b"steps = 3\n# \xff\xfe\n")
    with pytest.raises(ValueError, match=r"a.toml: not UTF-8 text \(invalid start byte at byte 12\)"):
        resolve_config(str(tmp_path / "a.toml"), {}, [])


def test_a_config_file_over_a_megabyte_is_refused(tmp_path):
    (tmp_path / "a.toml").write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ValueError, match=r"a.toml: config file of 1048579 bytes, more than 1048576"):
        resolve_config(str(tmp_path / "a.toml"), {}, [])


def test_unreadable_file_exits_1(tmp_path):
    missing = tmp_path / "missing.toml"
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(missing), "--list-settings"])
    assert exit_info.value.code == f"error: {missing}: cannot read config file: No such file or directory"


@pytest.mark.slow
def test_written_file_repeats_the_run(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "2", "--out", str(first)])
    run_cli(["-m", "ditmoe.train", "--config", str(first / "config.toml"), "--out", str(second)])

    def written(out):
        config = json.loads((out / "config.json").read_text())
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        resolved = tomllib.loads((out / "config.toml").read_text())
        return {**config["train"], "out": None}, config["model"], resolved, losses

    (train1, model1, file1, losses1), (train2, model2, file2, losses2) = written(first), written(second)
    assert (train1, model1) == (train2, model2)
    assert {**file1, "out": None} == {**file2, "out": None} and file1["model"]["hidden_size"] == 32
    assert len(losses1) == 2 and losses1 == losses2
