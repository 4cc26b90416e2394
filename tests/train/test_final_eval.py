"""The end-of-run evaluation of the digits demo shows one progress bar over its sampling batches."""

import json
import shutil

from ditmoe.train import final_eval as final_eval_module
from ditmoe.train.config import TrainConfig


def test_final_eval_shows_one_progress_bar(trained_digits_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained_digits_run, out)  # final_eval writes eval.json and the grid next to the checkpoints
    monkeypatch.setattr(final_eval_module, "BATCH_SIZE", 10)
    config = TrainConfig(out=str(out), eval_samples=20, eval_sampler="ddim", eval_steps=2)
    result = final_eval_module.final_eval(config)
    err = capsys.readouterr().err
    assert "final eval sampling" in err and "2/2" in err  # the bar reached its last batch
    assert "ddim sampling" not in err  # no per-batch bars of the sampler's steps
    assert result["eval_samples"] == 20 and 0.0 <= result["cond_accuracy"] <= 1.0
    assert result["pixel_fd"] > result["pixel_fd_real_floor"] > 0 and result["diversity"] > 0  # a 4-step model
    assert json.loads((out / "eval.json").read_text())["cond_accuracy"] == result["cond_accuracy"]
