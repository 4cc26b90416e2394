"""Resume under another topology through DeepSpeed's universal checkpoint (``--resume-universal``):
a 2-rank ZeRO-2 + EP 2 run checkpointed at step 3 continues on 1 process (EP 1) with the losses of
steps 4-5 and the final EMA of the uninterrupted 2-rank run, within 1e-5 (same micro-batches of 8:
the noise seeds follow the micro-batch index)."""

import pytest
import torch

from conftest import SMALL_DIGITS, run_cli
from test_zero_equivalence import STEPS, metrics, torchrun


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Uninterrupted 5 steps on 2 ranks, ZeRO-2 + EP 2, with a checkpoint at step 3."""
    out = tmp_path_factory.mktemp("source")
    torchrun(out, "--zero-stage", "2", "--ep-size", "2", "--set", "ckpt_every=3")
    return out


def test_resume_on_one_process_without_ep(source, tmp_path):
    proc = run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, *STEPS, "--zero-stage", "2", "--ep-size", "1",
                    "--micro-batch-size", "8", "--resume", str(source / "checkpoints/step_00000003"),
                    "--resume-universal", "--out", str(tmp_path)])
    assert "resumed from" in proc.stdout
    assert (source / "checkpoints/step_00000003_universal/zero").is_dir()
    ref, resumed = metrics(source)[3:], metrics(tmp_path)
    assert [r["step"] for r in resumed] == [4, 5]
    for key in ("loss", "mse", "vb", "balance_loss"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in ref], rel=1e-5), key
    ema_ref = torch.load(source / "checkpoints/step_00000005/ema.pt")
    ema = torch.load(tmp_path / "checkpoints/step_00000005/ema.pt")
    assert ema.keys() == ema_ref.keys()
    for name, value in ema.items():
        torch.testing.assert_close(value, ema_ref[name], rtol=1e-5, atol=1e-6, msg=name)
