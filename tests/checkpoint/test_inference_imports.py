"""Sampling and export load checkpoints without DeepSpeed or the trainer: checked in a fresh interpreter."""

import subprocess
import sys

import pytest

CHECK = """
import sys
import ditmoe.inference
import ditmoe.checkpoint
bad = sorted(m for m in sys.modules if m.split(".")[0] == "deepspeed" or m.startswith("ditmoe.train"))
print(bad)
"""


@pytest.mark.slow
def test_inference_imports_neither_deepspeed_nor_train():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
