"""Per-stage resume: a stage writes into a staging folder, renames it, then writes ``done.json`` (its settings).

A folder with a ``done.json`` whose settings equal the requested ones is finished and is not rerun; a
``done.json`` with other settings is refused naming the stage (delete the folder, or use another ``--out``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Callable

MARKER = "done.json"
ATTEMPT = "attempt.json"  # in a resumable stage's staging folder: the settings it was started with


class SettingsChanged(RuntimeError):
    """A finished stage was asked to run again with different settings."""


def settings_of(sizes: dict, keys: tuple[str, ...], *upstream: Path) -> dict:
    """A stage's own sizes plus a digest of the settings of the stages it reads (stale inputs are refused too)."""
    digest = hashlib.sha256(b"".join(json.dumps(json.loads((u / MARKER).read_text())["settings"], sort_keys=True)
                                     .encode() for u in upstream)).hexdigest()[:16]
    return {**{k: sizes[k] for k in keys}, "upstream": digest}


def finished(folder: Path, name: str, settings: dict) -> bool:
    """True when ``folder`` holds a finished run of ``name`` with exactly ``settings``; refuses other settings."""
    marker = folder / MARKER
    if not marker.is_file():
        return False
    saved = json.loads(marker.read_text())["settings"]
    if saved != json.loads(json.dumps(settings)):
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        raise SettingsChanged(f"stage {name!r} in {folder} was finished with other settings (changed: "
                              f"{', '.join(changed)}); delete {folder} to redo it, or choose another --out")
    return True


def run_stage(folder: Path, name: str, settings: dict, work: Callable[[Path], None], resumable: bool = False) -> bool:
    """Run ``work(staging)`` unless finished; the result appears at ``folder`` all at once. Returns True if it ran.

    An interrupted attempt leaves its staging folder. It is discarded, unless ``resumable`` and the attempt was
    made with the same settings (``ATTEMPT`` inside it): then ``work`` gets it back as it was left, and continues
    (an arm from its last checkpoint, a pair generator from its written shards)."""
    if finished(folder, name, settings):
        print(f"[efficacy] {name}: done, skipped ({folder})")
        return False
    staging = folder.with_name(f".{folder.name}.staging")
    attempt = staging / ATTEMPT
    resumed = resumable and attempt.is_file() and json.loads(attempt.read_text()) == json.loads(json.dumps(settings))
    if resumed:
        print(f"[efficacy] {name}: resuming the interrupted attempt in {staging}")
    else:
        shutil.rmtree(staging, ignore_errors=True)  # debris of an interrupted attempt
        staging.mkdir(parents=True)
        if resumable:
            attempt.write_text(json.dumps(settings, sort_keys=True))
    start = time.time()
    print(f"[efficacy] {name}: running")
    work(staging)
    attempt.unlink(missing_ok=True)
    marker = {"stage": name, "settings": settings, "seconds": round(time.time() - start, 2),
              **({"resumed": True} if resumed else {})}  # seconds: of the last attempt only
    (staging / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    print(f"[efficacy] {name}: finished in {marker['seconds']} s")
    return True


def run_stages(tasks: list[tuple[Path, str, dict, Callable[[Path], None]]], jobs: int = 1) -> None:
    """:func:`run_stage` for independent ``(folder, name, settings, work)`` tasks, ``jobs`` processes at a time.

    Finished tasks are skipped (and changed settings refused) here, before any worker starts. Workers are
    spawned (not forked: torch and the trainer hold threads and state) with one torch thread each; ``work``
    must be picklable (a module-level function or a ``functools.partial`` of one).
    """
    pending = [task for task in tasks if not finished(task[0], task[1], task[2])]
    if len(tasks) > len(pending):
        print(f"[efficacy] {len(tasks) - len(pending)} of {len(tasks)} {tasks[0][1].split()[0]} stages done, skipped")
    run_calls([partial(run_stage, *task) for task in pending], jobs)


def run_calls(calls: list[Callable[[], object]], jobs: int = 1) -> None:
    """Each call in order, ``jobs`` spawned processes at a time (one torch thread each); errors re-raise here."""
    if jobs <= 1 or len(calls) <= 1:
        for call in calls:
            call()
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()  # re-raises a worker's error here
