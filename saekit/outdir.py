"""Claim an output folder for one command: it is a writable folder, and no other saekit process writes it now.

`with claim(out, "train"):` makes the folder (and its parents), checks it is writable, and
holds a lock file there (`.saekit-lock`: PID, host, process start time, command) until
the block ends.  A second writer is refused with one line naming the holder; a lock left
by a process that is gone (killed, machine rebooted) is taken over.  Inside the block,
disk full, permission denied and read-only file systems become one `SaekitError` line
naming the file, so every command reports them the same way.

Re-entrant within a process (a pipeline claims a folder that a stage it calls claims
again); under torchrun only rank 0 holds the lock, since every rank writes the same run.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import socket
from pathlib import Path
from typing import Iterator

from saekit.errors import SaekitError

LOCK = ".saekit-lock"
DISK_ERRORS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}
_held: dict[Path, int] = {}  # folders this process holds, with a nesting count


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused PID is not taken for the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    started = holder.get("start_ticks")
    return started is None or _start_time(pid) in (None, started)


def describe(holder: dict) -> str:
    return f"PID {holder.get('pid')} on {holder.get('host')} ({holder.get('command')}, since {holder.get('started')})"


def _errno(e: BaseException) -> int | None:
    """The OS error number behind `e`: an OSError's own, or the one libraries put in their messages
    (safetensors: "(os error 28)", HDF5: "errno = 28")."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    m = re.search(r"os error (\d+)|errno = (\d+)", str(e))
    return int(m.group(1) or m.group(2)) if m else None


def disk_error(e: BaseException, what: str = "") -> SaekitError | None:
    """One line for an error a user can fix by choosing another place or freeing space; None for other errors."""
    why = DISK_ERRORS.get(_errno(e))
    if why is None:
        return None
    target = getattr(e, "filename", None) or what
    fix = "free some space" if _errno(e) in (errno.ENOSPC, errno.EDQUOT) else "choose a writable --out"
    return SaekitError(f"cannot write {target}: {why}; {fix} and rerun the command (train and finetune: with --resume); finished work is kept")


def prepare(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Make `path` a folder (parents too), refusing a file, an unwritable place or a missing parent that cannot be made."""
    if not str(path).strip():
        raise SaekitError(f"no output folder given; pass {flag} DIR")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SaekitError(f"{flag} {p} is a file; choose a folder (a new or existing directory)")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, str(p)) or SaekitError(
            f"cannot create {flag} {p} ({e.strerror or e}); choose a folder under a directory you can write") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise SaekitError(f"cannot write in {flag} {p}: permission denied; choose a writable folder")
    return p


def check_file_out(path: str | os.PathLike | None, flag: str) -> None:
    """Before a long run that ends by writing the file `path` (e.g. `--json`): not a folder, its folder made and writable."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise SaekitError(f"{flag} {p} is a folder; name a file")
    parent = p.parent
    if parent.exists() and not parent.is_dir():
        raise SaekitError(f"{flag} {p}: {parent} is a file, not a folder; choose another path")
    prepare(parent, f"the folder of {flag}")


def _lock(p: Path, command: str) -> None:
    lock = p / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start_ticks": _start_time(os.getpid()),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": command}
    tmp = p / f"{LOCK}.{os.getpid()}.tmp"
    for _ in range(3):
        tmp.write_text(json.dumps(me))
        try:
            os.link(tmp, lock)  # atomic: the lock appears complete, or not at all if another holds it
            return
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        try:
            holder = json.loads(lock.read_text())
        except FileNotFoundError:
            continue  # released meanwhile: try again
        except (OSError, ValueError):
            raise SaekitError(f"--out {p} has an unreadable lock file {lock}; if no saekit command writes there, delete it") from None
        if not isinstance(holder, dict):
            raise SaekitError(f"--out {p} has an unreadable lock file {lock}; if no saekit command writes there, delete it")
        if holder.get("host") == me["host"] and not _alive(holder):
            lock.unlink(missing_ok=True)  # left by a process that is gone: take it over
            continue
        where = "" if holder.get("host") == me["host"] else f" (another machine: if it is gone, delete {lock})"
        raise SaekitError(f"--out {p} is being written by {describe(holder)}{where}; wait for it to finish or choose another --out")
    raise SaekitError(f"--out {p}: could not take the lock {lock} (another command keeps taking it); retry")


@contextlib.contextmanager
def claim(path: str | os.PathLike, command: str, *, rank: int = 0) -> Iterator[Path]:
    """Hold `path` as this command's output folder for the block (see the module docstring); yields the folder."""
    made = not Path(path).exists()
    p = prepare(path)
    key = p.resolve()
    first = rank == 0 and key not in _held
    ok = False
    try:
        if first:
            _lock(p, command)
        if rank == 0:
            _held[key] = _held.get(key, 0) + 1
        try:
            yield p
            ok = True
        except Exception as e:  # noqa: BLE001 - only disk errors are turned into a line; the rest re-raised as they are
            err = disk_error(e, str(p))
            if err is None:
                raise
            raise err from None
    except OSError as e:
        err = disk_error(e, str(p))
        if err is None:
            raise
        raise err from None
    finally:
        if rank == 0 and key in _held:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
                with contextlib.suppress(OSError):
                    (p / LOCK).unlink()
                    if made and not ok:
                        p.rmdir()  # a command that failed leaves no empty folder it made (rmdir refuses a non-empty one)


def is_lock(name: str) -> bool:
    """Files of the lock, which a check for an empty or foreign folder must ignore."""
    return name == LOCK or name.startswith(LOCK + ".")
