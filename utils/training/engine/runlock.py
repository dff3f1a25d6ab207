"""One writer per run: an advisory lock on `<run_dir>/.lock`, taken over when its holder died.

The lock is an `fcntl.flock` on the file, which the kernel drops when the holding process
dies (even by SIGKILL), so a stale lock is detected simply by being able to take it. The
file also records the holder's pid and host for the message a second trainer gets. Where
flock is unsupported (some network mounts) the pid in the file is checked instead.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another live process is training this run."""

    def __init__(self, path: Path, holder: dict) -> None:
        self.path = path
        self.holder = holder
        super().__init__(
            f"run folder {path.parent} is being trained by another process "
            f"(pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}); "
            "stop that process or choose another run name"
        )


class LockFileUnusable(RunLocked):
    """The lock file cannot be opened (a symlink, a folder, no permission)."""

    def __init__(self, path: Path, error: OSError) -> None:
        self.path = path
        self.holder = {}
        RuntimeError.__init__(
            self,
            f"cannot use the lock file {path} ({error.strerror or error}); it must be a plain file: "
            "remove it if no trainer is running on this run",
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self.took_over_stale = False

    def _read_holder(self) -> dict:
        """The recorded holder; {} for an empty, unreadable or foreign lock file."""
        try:
            with open(self.path, "rb") as f:
                holder = json.loads(f.read(64 * 1024).decode("utf-8") or "{}")
        except (OSError, ValueError, RecursionError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # never through a symlink: the lock file is truncated and written below
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise LockFileUnusable(self.path, exc) from exc
        previous = self._read_holder()
        locked_by_kernel = False
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked_by_kernel = True
            except BlockingIOError:
                os.close(fd)
                raise RunLocked(self.path, previous) from None
            except OSError:
                locked_by_kernel = False  # flock unsupported here: fall back to the pid check
        if not locked_by_kernel:
            pid = previous.get("pid")
            same_host = previous.get("host") == socket.gethostname()
            if isinstance(pid, int) and pid != os.getpid() and same_host and _pid_alive(pid):
                os.close(fd)
                raise RunLocked(self.path, previous)
        self.took_over_stale = bool(previous.get("pid")) and previous.get("pid") != os.getpid()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty file reads as "no holder"
        except OSError:
            pass  # releasing the flock below is what matters
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
