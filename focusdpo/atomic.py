"""Writes that never destroy what was there: a staging file or folder beside the target, then a rename.

Used by every writer (pair datasets, caches, checkpoints, reports, images): a kill or a full disk during the
write leaves the previous file or folder intact, and a full disk is named with the folder.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from focusdpo.errors import OutputError


def check_out_is_not_input(out: str, source: str) -> None:
    """Refuse ``--out`` equal to the dataset being read, before anything is computed."""
    if source != "toy" and Path(out).resolve() == Path(source).resolve():
        raise OutputError(f"--out {out} is the input dataset itself: write to a new folder, check it, then "
                          "replace the old one if you want")


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
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    with disk_full_names(path.parent):
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
