"""A Hugging Face export replaces its folder as a whole: a non-empty --out only with --overwrite, never a mix of
two exports (a stale model.safetensors beside a new shard index), nothing left behind by a failed export."""

import hashlib
import json
import re

import pytest
import torch

from ditmoe.hf import export as export_module
from ditmoe.hf.export import export
from ditmoe.hf.load import load_hf_folder
from ditmoe.model import DiT, get_preset

from conftest import load_tool


def tiny_model(seed: int) -> DiT:
    torch.manual_seed(seed)
    model = DiT(get_preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def contents(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def siblings(folder) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p != folder)


def test_a_non_empty_folder_is_refused_and_kept(tmp_path):
    out = tmp_path / "hf"
    export(tiny_model(0), out, objective="ddpm")
    before = contents(out)
    with pytest.raises(FileExistsError, match=f"--out {out} is not empty: pass --overwrite"):
        export(tiny_model(1), out, objective="ddpm", max_shard_size="20KB")
    assert contents(out) == before and siblings(out) == []
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "config.json").write_text("{}")  # a user's own file is not overwritten either
    with pytest.raises(FileExistsError, match="not empty"):
        export(tiny_model(1), tmp_path / "user", objective="ddpm")
    assert (tmp_path / "user" / "config.json").read_text() == "{}"


@pytest.mark.parametrize("first, second", [("5GB", "20KB"), ("20KB", "5GB")],
                         ids=["single-to-shards", "shards-to-single"])
def test_overwrite_leaves_exactly_the_new_export(tmp_path, first, second):
    out, fresh = tmp_path / "hf", tmp_path / "fresh"
    export(tiny_model(0), out, objective="ddpm", max_shard_size=first)
    export(tiny_model(1), out, objective="ddpm", max_shard_size=second, overwrite=True)
    export(tiny_model(1), fresh, objective="ddpm", max_shard_size=second)
    assert contents(out) == contents(fresh)  # no file of the first export is left
    loaded, _ = load_hf_folder(out)
    want = tiny_model(1).state_dict()
    assert all(torch.equal(value, want[name]) for name, value in loaded.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "hf"]  # no staging or replaced folder


def test_a_failed_export_leaves_the_old_folder_and_nothing_else(tmp_path, monkeypatch):
    out = tmp_path / "hf"
    export(tiny_model(0), out, objective="ddpm")
    before = contents(out)

    def disk_full(folder):
        raise OSError(28, "No space left on device", str(folder / "dit.py"))

    monkeypatch.setattr(export_module, "write_remote_code", disk_full)
    with pytest.raises(OSError, match=f"^no space left on .* writing {re.escape(str(out))}$"):
        export(tiny_model(1), out, objective="ddpm", overwrite=True)
    assert contents(out) == before and siblings(out) == []


def test_the_converter_reads_only_checkpoints_of_the_run(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        load_tool("convert_ckpt_to_hf").main(["--ckpt", str(tmp_path / "run"), "--tag", "../../other/step_00000010",
                                              "--out", str(tmp_path / "hf")])
    assert exit_info.value.code == "error: --tag '../../other/step_00000010' must name a checkpoint of the run " \
                                   "(step_XXXXXXXX or latest), not a path"


def test_the_converter_refuses_to_export_over_its_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        load_tool("convert_ckpt_to_hf").main(["--ckpt", str(run / "checkpoints"), "--out", str(run), "--overwrite"])
    assert exit_info.value.code == f"error: --out {run} holds the checkpoint --ckpt {run / 'checkpoints'}: " \
                                   "export to another folder"
    assert (run / "checkpoints").is_dir()


def test_the_vae_is_recorded_in_config_json_and_read_back(tmp_path):
    """The VAE that decodes the samples (a checkpoint's meta ``vae``) goes into config.json and back into the meta
    ``tools/sample.py`` reads; a folder without it records null and loads without it."""
    export(tiny_model(0), tmp_path / "a", objective="ddpm", vae={"name": "org/sd-vae", "scaling_factor": 0.18215})
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["vae_name_or_path"], config["vae_scaling_factor"]) == ("org/sd-vae", 0.18215)
    assert load_hf_folder(tmp_path / "a")[1]["vae"] == {"name": "org/sd-vae", "scaling_factor": 0.18215}
    card = (tmp_path / "a" / "README.md").read_text()
    assert "| VAE | `org/sd-vae` (not in these weights): decode `latents / 0.18215` |" in card
    assert "--vae VAE" not in card
    export(tiny_model(0), tmp_path / "b", objective="ddpm")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["vae_name_or_path"] is None and config["vae_scaling_factor"] is None
    assert "vae" not in load_hf_folder(tmp_path / "b")[1]
    assert "--vae VAE --scaling-factor F" in (tmp_path / "b" / "README.md").read_text()  # 4 channels: latents


@pytest.mark.parametrize("vae, message", [
    ({"name": " ", "scaling_factor": 0.5}, "config vae_name_or_path must be a non-empty string, got ' '"),
    ({"scaling_factor": 0.5}, "config vae_name_or_path must be a non-empty string, got None"),
    ({"name": "org/sd-vae"}, "config vae_scaling_factor of vae 'org/sd-vae' must be a positive number, got None"),
    ({"name": "org/sd-vae", "scaling_factor": float("nan")}, "must be a positive number, got nan"),
])
def test_a_bad_vae_record_writes_nothing(tmp_path, vae, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        export(tiny_model(0), tmp_path / "o", objective="ddpm", vae=vae)
    assert not (tmp_path / "o").exists()
