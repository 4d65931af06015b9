"""Writes that never destroy what was there: a staging folder beside the target, then a rename.

Used by every command that writes a pair dataset (``focusdpo pairs|focus|embed``, the importers) and by
the trainer's checkpoints: a kill or a full disk during the write leaves the previous folder intact.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .data import with_image_decoding


class OutputError(OSError):
    """An output folder cannot be written as asked; the message names the folder and the fix."""


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


def save_dataset(dataset, out: str) -> None:
    """``dataset.save_to_disk(out)`` through ``.out.staging`` and two renames: ``out`` is either the old
    dataset or the new one, never a mix (a kill between the renames leaves the old one as ``.out.old``)."""
    target = Path(out).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging, old = (target.parent / f".{target.name}.{tag}" for tag in ("staging", "old"))
    shutil.rmtree(staging, ignore_errors=True)  # debris of an earlier kill
    with disk_full_names(target.parent, staging):
        with_image_decoding(dataset, True).save_to_disk(str(staging))  # saved images decode for any user
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
