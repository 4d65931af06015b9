"""Writes that never destroy what was there: a staging file or folder beside the target, then a rename.

Used by every writer (pair datasets, caches, checkpoints, reports, images): a kill or a full disk during the
write leaves the previous file or folder intact, and a full disk is named with the folder.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

from focusdpo.errors import OutputError

LOCK_NAME = ".focusdpo.lock"  # a run folder's lock (inside it); a dataset writer's lock lies beside its folder

# Written into every folder a focusdpo writer makes: what it may later replace or clear is only what holds it.
OUTPUT_MARKER = ".focusdpo-output"


def check_out_is_not_input(out: str | Path, *inputs: str | Path | None) -> None:
    """Refuse an output folder that is, holds or lies inside one of the ``inputs`` (dataset, model folder, LoRA),
    before anything is computed: replacing or clearing it would destroy what is being read."""
    target = Path(out).resolve()
    for source in inputs:
        if not source or str(source) == "toy" or not Path(source).exists():
            continue
        read = Path(source).resolve()
        if target == read or read in target.parents or target in read.parents:
            where = "is" if target == read else "lies inside" if read in target.parents else "holds"
            raise OutputError(f"the output folder {out} {where} the input {source}: write to a new folder, check "
                              "it, then replace the old one if you want")


def check_replaceable(folder: Path) -> None:
    """Refuse to replace or clear an existing, non-empty ``folder`` that focusdpo did not write (no marker)."""
    if folder.is_dir() and any(folder.iterdir()) and not (folder / OUTPUT_MARKER).exists():
        shown = ", ".join(sorted(p.name for p in folder.iterdir())[:5])
        raise OutputError(f"{folder} holds files focusdpo did not write ({shown}, ...): it is left as it is; "
                          "choose a new or empty folder")


def mark_output(folder: Path) -> None:
    (folder / OUTPUT_MARKER).touch()


@contextmanager
def disk_full_names(folder: Path, staging: Path | None = None):
    """Turn ENOSPC into a message naming ``folder``; remove ``staging`` on any failure (no debris)."""
    try:
        yield
    except BaseException as e:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OutputError(f"no space left on the device of {folder} while writing there: free space or "
                              "choose another folder; nothing partial was kept") from None
        raise


def atomic_write(path: str | Path, write) -> Path:
    """``write(staging_path)``, then rename the staging file onto ``path``: a reader sees the old file or the whole
    new one, never half of it. The staging file sits beside ``path`` (same filesystem, so the rename is atomic)."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp")
    with disk_full_names(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(staging)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
    os.replace(staging, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda staging: staging.write_text(text))


def save_png(image, path: str | Path) -> Path:
    """A PIL image as PNG, atomically."""
    return atomic_write(path, lambda staging: image.save(staging, format="PNG"))


def take_lock(lock: Path, busy: str, fix: str, error=OutputError) -> Path:
    """Create ``lock`` holding this host and pid; refuse (``error``: ``busy``, the owner, ``fix``) while another live
    process holds it, and take over the lock of one that died without cleaning up."""
    mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = read_lock(lock)
            if lock_is_live(owner):
                raise error(f"{busy} (pid {owner.get('pid')} on {owner.get('host')}): wait for it to end or {fix} "
                            f"(if no such process exists, delete {lock})") from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        atexit.register(release_lock, lock)
        return lock
    raise error(f"cannot create the lock file {lock}: another process keeps creating it")


def read_lock(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def lock_is_live(owner: dict) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    if owner.get("host") != socket.gethostname():
        return True  # another machine on a shared folder: its pid cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_lock(lock: Path | None) -> None:
    """Remove the lock if this process holds it."""
    if lock is not None and read_lock(lock).get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


@contextmanager
def output_lock(out: str | Path, take: bool = True):
    """One writer at a time for the folder ``out``: a lock file beside it for as long as the command runs.

    ``take``: False on the other processes of a multi-process run (``accelerate launch``): the main process holds
    the lock for the whole run, and a rank that took its own would find the main one's and refuse."""
    if not take:
        yield
        return
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = take_lock(out.parent / f".{out.name}.lock", f"another process is writing {out}",
                     "choose another --out")
    try:
        yield
    finally:
        release_lock(lock)
