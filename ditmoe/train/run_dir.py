"""The run folder ``--out``: one training at a time, never a silent start over a previous run.

* An exclusive ``fcntl`` lock on ``OUT/.lock`` held by rank 0 for the whole run: the kernel releases it
  when the process ends, however it ends (kill -9, a SLURM requeue), so a stale lock file is harmless.
  The file names the holder (host, pid, start time) for the error of a second run.
* A folder that holds a run (checkpoints or metrics) is continued only with ``--resume``, or started over
  only with ``--overwrite``; anything else is refused before a file is touched.
* ``--resume auto`` takes the checkpoint ``latest`` names; without ``latest`` (a crash during the first
  save, a deleted file) the newest complete checkpoint, saying so.
"""

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from .. import checkpoint
from ..checkpoint.layout import EMA_FILE, LATEST, META

LOCK_FILE = ".lock"
RUN_FILES = ("metrics.jsonl", "tensorboard", "checkpoints")  # what a run writes besides its config


def is_complete(tag_dir: Path) -> bool:
    """Whether every file of a checkpoint was written: ``meta.json``, the EMA files, and DeepSpeed's model
    and (ZeRO-1/2/3) per-rank optimizer states. ``latest`` is written only after these, on every rank."""
    try:
        meta = json.loads((tag_dir / META).read_text())
        world, stage, ema_shards = meta["world_size"], meta["zero_stage"], meta.get("ema_shards", 0)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return ((tag_dir / EMA_FILE).is_file() and len(list(tag_dir.glob("ema_local_rank*.pt"))) >= ema_shards
            and any(tag_dir.glob("*model_states.pt"))
            and (stage == 0 or len(list(tag_dir.glob("*optim_states.pt"))) >= world))


class RunFolderBusy(ValueError):
    """Another live training holds the run folder's lock."""


class RunFolder:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.ckpt_root = self.out / "checkpoints"
        self._lock = None

    def lock(self) -> None:
        """Take the folder's exclusive lock (rank 0, before anything is written); ``RunFolderBusy`` if held."""
        self.out.mkdir(parents=True, exist_ok=True)
        handle = open(self.out / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            handle.close()
            raise RunFolderBusy(f"run folder {self.out} is in use by another training ({holder}); wait for it to "
                                f"end or pass another --out") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def holds_run(self) -> bool:
        """Checkpoints (complete or not), logged metrics or TensorBoard events from an earlier run."""
        metrics, events = self.out / "metrics.jsonl", self.out / "tensorboard"
        return (bool(self.tag_dirs()) or (metrics.is_file() and metrics.stat().st_size > 0)
                or (events.is_dir() and any(events.rglob("events.out.tfevents.*"))))

    def tag_dirs(self) -> list[Path]:
        """Checkpoint tag directories, oldest step first."""
        if not self.ckpt_root.is_dir():
            return []
        return sorted(p for p in self.ckpt_root.glob("step_*") if p.is_dir() and p.name[5:].isdigit())

    def prepare(self, *, resume: str | None, overwrite: bool) -> None:
        """Refuse to train over an earlier run unless resumed or overwritten; ``overwrite`` deletes its files."""
        if not self.holds_run() or resume is not None:
            return
        if not overwrite:
            tags = self.tag_dirs()
            logged = "metrics.jsonl" if (self.out / "metrics.jsonl").is_file() else "TensorBoard events"
            what = f"checkpoints up to {tags[-1].name}" if tags else logged
            raise ValueError(f"{self.out} already holds a run ({what}): pass --resume auto to continue it, "
                             f"--overwrite to delete it and start over, or another --out")
        for name in RUN_FILES:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        print(f"--overwrite: deleted the earlier run's {', '.join(RUN_FILES)} in {self.out}", flush=True)

    def auto_resume_tag(self) -> tuple[Path | None, str | None]:
        """The checkpoint ``--resume auto`` continues from: ``latest``, else the newest complete one, else None
        (a fresh start; incomplete checkpoints, from a crash during a save, are later overwritten); and a
        note for the log when ``latest`` was not used."""
        tag_dir = checkpoint.latest_tag_dir(self.ckpt_root)
        if tag_dir is not None:
            return tag_dir, None
        tags = self.tag_dirs()
        complete = [tag for tag in tags if is_complete(tag)]
        if complete:
            return complete[-1], (f"{self.ckpt_root / LATEST} is missing; resuming from the newest complete "
                                  f"checkpoint {complete[-1].name}")
        if tags:
            return None, (f"no complete checkpoint in {self.ckpt_root} (incomplete: {', '.join(t.name for t in tags)}"
                          "); starting from step 0")
        return None, None
