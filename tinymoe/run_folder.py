"""The run folder (runs/<name>/) and the promise that no run is ever lost.

A folder that holds a run (a checkpoint, or a log) is never overwritten by accident:

    train again, no flag      refused: the error says --resume, --overwrite or --name
    --resume                  continue from ckpt.safetensors; log.jsonl is appended to
    --overwrite               delete the old run's files, then start over
    --resume past --steps     nothing to train: said so, nothing changed

`plan_run` decides, without touching the disk; `start_run` carries the decision out (rank
0 only), after the whole configuration has been validated.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .checkpoint import checkpoint_step, prev_path, remove_stale_temporaries

CHECKPOINT = "ckpt.safetensors"
LOG = "log.jsonl"
RUN_FILES = (CHECKPOINT, "ckpt.prev.safetensors", LOG, "config.json", "sample.txt", "loss.png",
             "expert_load.png")


@dataclass
class RunPlan:
    folder: str
    checkpoint: str
    log: str
    resume_step: int | None     # the checkpoint's step when resuming, else None (a fresh run)


def plan_run(folder: str, resume: bool, overwrite: bool) -> RunPlan:
    """What this run does with its folder; raises before anything is changed."""
    ckpt, log = os.path.join(folder, CHECKPOINT), os.path.join(folder, LOG)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"train: the run folder {folder} is a file; choose another --name or --out-dir")
    parent = os.path.dirname(os.path.abspath(folder))
    while not os.path.exists(parent):                           # the nearest existing folder above
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"train: --out-dir cannot hold {folder}: {parent} is a file, not a folder")
    if resume:
        if not os.path.exists(ckpt):
            hint = (f"; its previous checkpoint {prev_path(ckpt)} can be renamed to {CHECKPOINT}"
                    if os.path.exists(prev_path(ckpt)) else "")
            raise FileNotFoundError(f"train: --resume, but there is no checkpoint at {ckpt}{hint}")
        return RunPlan(folder, ckpt, log, resume_step=checkpoint_step(ckpt))   # the header alone
    holds = [f for f in (CHECKPOINT, LOG) if os.path.exists(os.path.join(folder, f))]
    if holds and not overwrite:
        what = "a checkpoint" if CHECKPOINT in holds else "a log"
        raise FileExistsError(
            f"train: {folder} already holds a run ({what}: {', '.join(holds)}); pass --resume to "
            f"continue it, --overwrite to delete it and start over, or --name to start another run")
    return RunPlan(folder, ckpt, log, resume_step=None)


def start_run(plan: RunPlan) -> None:
    """Create the folder; on a fresh run, delete an old run's files (--overwrite said so)."""
    os.makedirs(plan.folder, exist_ok=True)
    remove_stale_temporaries(plan.folder)
    if plan.resume_step is None:
        for name in RUN_FILES:
            path = os.path.join(plan.folder, name)
            if os.path.exists(path):
                os.remove(path)
