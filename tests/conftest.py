"""Shared fixtures: run the real command-line entry points in processes of their own."""

import atexit
import gc
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# Triton runs kernels on CPU tensors only in its interpreter, chosen when Triton is imported (expert_gemm=triton)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from forkserver import ForkServer  # noqa: E402

gc.freeze()  # torch's objects: the collector need not walk them again and again during the session

REPO = Path(__file__).resolve().parents[1]
FORKSERVER_CLIENT = str(REPO / "tests" / "forkserver.py")
TORCHRUN_FLAGS = {"--standalone", "--no-python", "--no_python", "--run-path", "--run_path"}  # take no value

# A very small digits run: same code path as the demo, a few seconds per command.
SMALL_DIGITS = [
    "--preset", "demo", "--global-batch-size", "16",
    "--set", "model.hidden_size=32", "--set", "model.depth=2", "--set", "model.num_heads=2",
    "--set", "log_every=1", "--set", "eval_samples=0", "--set", "eval_every=0", "--set", "sample_every=0",
]


# Fixed seed and learning rate for runs that are compared across topologies.
STEPS = ["--steps", "5", "--seed", "3", "--set", "lr=3e-3"]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 (all bound at once, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """A TCP port free on 127.0.0.1."""
    return free_ports(1)[0]


def all_records(out) -> list[dict]:
    """The records of ``out/metrics.jsonl``; [] while the run has not written it yet."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def metrics(out) -> list[dict]:
    """The training records of ``out/metrics.jsonl`` (those of logged steps, with a 'loss')."""
    return [record for record in all_records(out) if "loss" in record]


def eval_records(out) -> list[dict]:
    """The evaluation records of ``out/metrics.jsonl`` (validation losses, sample quality)."""
    return [record for record in all_records(out) if "loss" not in record]


@pytest.fixture(scope="module")
def one_thread():
    """The CPU cores are shared: one intra-op thread for this module avoids OpenMP oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchrun(out, *args, nproc=2, env=None):
    """The SMALL_DIGITS + STEPS run on ``nproc`` real ranks (gloo), extra ``args`` last, ``env`` added."""
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
              "--master_addr", "127.0.0.1"]
    return run_cli([*launch, "-m", "ditmoe.train", *SMALL_DIGITS, *STEPS, *args, "--out", str(out)],
                   env={"OMP_NUM_THREADS": "1", **(env or {})})


def load_tool(name: str):
    """``tools/NAME.py`` as a module, to call its ``main(argv)`` in this process (fast error checks)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# DITMOE_TEST_FRESH_PROCESSES=1 starts every command in a new interpreter instead of the fork server.
FRESH_PROCESSES = os.environ.get("DITMOE_TEST_FRESH_PROCESSES", "") == "1"
_fork_server = None


def fork_server() -> ForkServer:
    """The session's fork server (tests/forkserver.py), started on first use."""
    global _fork_server
    if _fork_server is None:
        directory = tempfile.mkdtemp(prefix="ditmoe-forkserver-")
        _fork_server = ForkServer(directory, {**os.environ, "PYTHONPATH": str(REPO)})
        atexit.register(_fork_server.close)
    return _fork_server


def ranks_through_fork_server(args: list[str]) -> list[str]:
    """``-m torch.distributed.run OPTIONS (-m MODULE | SCRIPT) ...`` with each rank started by forkserver.py."""
    if args[:2] != ["-m", "torch.distributed.run"]:
        return args
    i = 2
    while i < len(args):
        if args[i] in ("-m", "--module"):
            return [*args[:i], FORKSERVER_CLIENT, "-m", *args[i + 1:]]
        if not args[i].startswith("-"):
            return [*args[:i], FORKSERVER_CLIENT, *args[i:]]
        i += 1 if "=" in args[i] or args[i] in TORCHRUN_FLAGS else 2
    raise ValueError(f"no script in torchrun arguments {args}")


def _decoded(file) -> str:
    file.seek(0)
    return file.read().decode("utf-8", errors="replace").replace("\r\n", "\n")


def run_cli(args: list[str], *, check: bool = True, env: dict | None = None, timeout: int = 600):
    """Run ``python ARGS`` from the repository root in a process of its own; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    if FRESH_PROCESSES:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    else:
        server = fork_server()
        args = ranks_through_fork_server(args)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            code = server.run(args, env=full_env, cwd=str(REPO), timeout=timeout, stdout=out.fileno(),
                              stderr=err.fileno())
            proc = subprocess.CompletedProcess([sys.executable, *args], code, _decoded(out), _decoded(err))
    if check and proc.returncode != 0:
        output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{output}")
    return proc


@pytest.fixture(scope="session")
def trained_digits_run(tmp_path_factory):
    """A 4-step digits run with a checkpoint, shared by the sampling-tool tests."""
    out = tmp_path_factory.mktemp("digits_run")
    run_cli(["-m", "ditmoe.train", *SMALL_DIGITS, "--steps", "4", "--out", str(out)])
    return out
