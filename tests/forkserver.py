"""A fork server for the tests: commands in fresh processes without paying the imports each time.

A test that runs ``python -m ditmoe.train ...``, ``python tools/sample.py ...`` or a rank under torchrun would
spend about 3 s importing torch, DeepSpeed and ditmoe before doing any work. Here one server process imports
them once (and nothing else: no tensors, no threads) and forks a child for every command. The child is a
process of its own, as under ``subprocess.run``: its own pid, working directory, environment, sys.path,
standard streams, signals and exit status (a traceback and status 1 for an uncaught exception, SystemExit's
code otherwise). Only the imports are shared.

Per command the server forks a small monitor that forks the command, reports its pid, forwards signals asked
for, kills it if the caller goes away, and reports its exit status as ``Popen.returncode`` would (negative for
a signal). The caller's stdin/stdout/stderr file descriptors travel with the request (SCM_RIGHTS), so the
command writes straight where the caller would have.

Run as a script (``python forkserver.py ARGS``) it is the client torchrun starts for each rank: it asks the
server named by ``$DITMOE_TEST_FORKSERVER`` to run ``python ARGS`` with its own environment and streams,
forwards the signals it gets, and exits as the command did. Without a server it runs ``python ARGS`` itself.

This file imports only the standard library at the top: the client must start in milliseconds.
"""

import gc
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys

SOCKET_ENV = "DITMOE_TEST_FORKSERVER"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# Imported once by the server; every command they spare is ~3 s faster. Nothing here may start a thread or
# read a setting from the environment at import time that a test changes (OMP_NUM_THREADS is re-applied).
PRELOAD = ("torch", "torch._dynamo", "torch.utils.cpp_extension", "torch.utils.tensorboard", "torch.distributed.run",
           "deepspeed", "tqdm.auto", "numpy", "scipy.linalg", "ditmoe.train.__main__",
           "ditmoe.train.final_eval", "ditmoe.inference", "ditmoe.sampling", "ditmoe.checkpoint.engine_state",
           "ditmoe.parallel.expert_parallel", "ditmoe.data.digits", "safetensors.torch", "PIL.Image")


# ---- wire format: 4-byte length + JSON, file descriptors attached to the request --------------------------

def _send(conn: socket.socket, message: dict, fds: tuple[int, ...] = ()):
    data = json.dumps(message).encode()
    payload = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(conn, [payload], list(fds))
    else:
        conn.sendall(payload)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    chunks = b""
    while len(chunks) < n:
        chunk = conn.recv(n - len(chunks))
        if not chunk:
            raise EOFError("fork server connection closed")
        chunks += chunk
    return chunks


def _recv(conn: socket.socket, with_fds: int = 0) -> tuple[dict, list[int]]:
    fds = []
    if with_fds:
        head, fds, _, _ = socket.recv_fds(conn, 4, with_fds)
        if len(head) < 4:
            head += _recv_exact(conn, 4 - len(head))
    else:
        head = _recv_exact(conn, 4)
    (n,) = struct.unpack("!I", head)
    return json.loads(_recv_exact(conn, n)), fds


# ---- server -----------------------------------------------------------------------------------------------

def serve(path: str):
    """Import PRELOAD, then fork a monitor per connection until stdin closes (the test session ended)."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # the garbage collector of a command then leaves these objects (and their pages) alone
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped by the kernel
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1):
            os._exit(0)
        if listener in readable:
            conn, _ = listener.accept()
            if os.fork() == 0:
                listener.close()
                _monitor(conn)  # never returns
            conn.close()


def _monitor(conn: socket.socket):
    """Fork the requested command; relay its pid, signals for it and its exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    request, fds = _recv(conn, with_fds=3)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _become_command(request, fds)  # never returns
    for fd in fds:
        os.close(fd)
    _send(conn, {"pid": pid})
    pidfd = os.pidfd_open(pid)
    while True:
        readable, _, _ = select.select([conn, pidfd], [], [])
        if pidfd in readable:
            break
        try:
            message, _ = _recv(conn)
            os.kill(pid, message["signal"])
        except EOFError:  # the caller went away: so does its command
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
    os._exit(0)


def _become_command(request: dict, fds: list[int]):
    """Turn this forked process into ``python ARGV`` run in CWD with ENV and the given streams; never returns."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    env = request["env"]
    own_path = os.environ.get("_FORKSERVER_PYTHONPATH", "").split(os.pathsep)
    base_path = [p for p in sys.path[1:] if p not in own_path]  # the interpreter's own entries
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(env)
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", closefd=False, buffering=1 if unbuffered else -1)
    sys.stderr = open(2, "w", closefd=False, buffering=1, errors="backslashreplace")
    for name in FORWARDED_SIGNALS:
        signal.signal(name, signal.SIG_DFL)
    if env.get("OMP_NUM_THREADS", "").isdigit():  # a new interpreter would have read it at start
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    extra_path = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    try:
        _run_main(request["argv"], extra_path, base_path)
        code = 0
    except SystemExit as exit:
        code = _exit_status(exit.code)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _exit(code)


def _run_main(argv: list[str], extra_path: list[str], base_path: list[str]):
    """What the interpreter does with ``python ARGV``: sys.argv, sys.path[0], then the module, code or script."""
    import runpy

    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[:] = [os.getcwd(), *extra_path, *base_path]
        for name in (argv[1], f"{argv[1]}.__main__"):  # a new interpreter has not imported them yet
            sys.modules.pop(name, None)
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path[:] = ["", *extra_path, *base_path]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        script = os.path.abspath(argv[0])
        sys.argv = list(argv)
        sys.path[:] = [os.path.dirname(script), *extra_path, *base_path]
        runpy.run_path(script, run_name="__main__")


def _exit_status(code) -> int:
    """The exit status the interpreter gives ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _exit(code: int):
    """Leave as the interpreter does (join threads, atexit callbacks, flush the streams) but without tearing
    the modules down: that would cost every command ~0.5 s, copying the server's pages it touches."""
    import atexit
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


# ---- callers ----------------------------------------------------------------------------------------------

class ForkServer:
    """One server process (started on first use) and the ``run`` that replaces ``subprocess.run``."""

    def __init__(self, directory: str, env: dict[str, str]):
        self.path = os.path.join(directory, "forkserver.sock")
        env = {**env, "_FORKSERVER_PYTHONPATH": env.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", self.path], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for line in self.proc.stdout:  # imports may print first
            if line == "ready\n":
                return
        raise RuntimeError(f"the test fork server did not start (exit status {self.proc.wait()})")

    def run(self, argv: list[str], *, env: dict[str, str], cwd: str, timeout: float,
            stdout: int, stderr: int) -> int:
        """``python ARGV`` in a forked process writing to the given descriptors; returns its exit status. The
        command's environment names this server, so the ranks of a torchrun command find it too."""
        with open(os.devnull) as stdin, _connect(self.path) as conn:
            return _call(conn, argv, {**env, SOCKET_ENV: self.path}, cwd, (stdin.fileno(), stdout, stderr), timeout)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _connect(path: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    return conn


def _call(conn: socket.socket, argv, env, cwd, fds, timeout: float | None, on_signal=None) -> int:
    """Ask the server on ``conn`` to run ``python ARGV``; wait for its exit status (``timeout`` seconds at most:
    then closing the connection makes the monitor kill the command)."""
    _send(conn, {"argv": list(argv), "env": dict(env), "cwd": cwd}, fds)
    _recv(conn)  # the command's pid: it has started
    if on_signal is not None:
        on_signal(lambda sig: _send(conn, {"signal": int(sig)}))
    readable, _, _ = select.select([conn], [], [], timeout)
    if not readable:
        conn.close()
        raise subprocess.TimeoutExpired([sys.executable, *argv], timeout)
    message, _ = _recv(conn)
    return message["returncode"]


def _client(argv: list[str]):
    """Run ``python ARGV`` through the server with this process's environment, streams and signals."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        os.execv(sys.executable, [sys.executable, *argv])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # torchrun starts ranks with python -u

    def install(forward):
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, lambda signum, frame: forward(signum))

    code = _call(_connect(path), argv, env, os.getcwd(), (0, 1, 2), None, on_signal=install)
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2])
    else:
        _client(sys.argv[1:])
