"""Resume under another topology through DeepSpeed's universal checkpoint (``--resume-universal``):
a run checkpointed at step 3 continues under another world size and EP size with the losses of
steps 4-5 and the final EMA of the uninterrupted source run, within 1e-5 (same micro-batches of 8:
the noise seeds follow the micro-batch index). ZeRO-1/2 and ZeRO-3 layouts do not mix: a clear error."""

import pytest
import torch

from conftest import SMALL_DIGITS, STEPS, metrics, run_cli, torchrun

# name: (source ZeRO stage, EP size, ranks) -> (target ZeRO stage, EP size, ranks)
PAIRS = {
    "zero2-ep2-2ranks-to-1process": ((2, 2, 2), (2, 1, 1)),
    "zero2-1process-to-ep2-2ranks": ((2, 1, 1), (2, 2, 2)),
    "zero3-ep2-2ranks-to-1process": ((3, 2, 2), (3, 1, 1)),
    "zero3-2ranks-to-1process": ((3, 1, 2), (3, 1, 1)),  # flat ZeRO-3 tensors, shaped for the expert renames
}


def run(out, stage, ep, ranks, *extra, check=True):
    args = ["--zero-stage", str(stage), "--ep-size", str(ep), *extra]
    if ranks > 1:
        return torchrun(out, *args, nproc=ranks)
    return run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, *STEPS, "--micro-batch-size", "8", *args, "--out", str(out)],
                   check=check)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Uninterrupted 5-step runs with a checkpoint at step 3, one per source topology (made on demand)."""
    made = {}

    def get(topology):
        if topology not in made:
            made[topology] = tmp_path_factory.mktemp("source")
            run(made[topology], *topology, "--set", "ckpt_every=3")
        return made[topology]

    return get


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.slow
def test_resume_under_another_topology(sources, tmp_path, pair):
    source_topology, target_topology = PAIRS[pair]
    source = sources(source_topology)
    proc = run(tmp_path, *target_topology, "--resume", str(source / "checkpoints/step_00000003"), "--resume-universal")
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


@pytest.mark.slow
def test_crossing_between_zero12_and_zero3_is_a_clear_error(sources, tmp_path):
    source = sources((2, 1, 1))
    proc = run(tmp_path, 3, 1, 1, "--resume", str(source / "checkpoints/step_00000003"), "--resume-universal",
               check=False)
    assert proc.returncode != 0
    assert "was saved with ZeRO-2" in proc.stderr and "use --zero-stage 2" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
