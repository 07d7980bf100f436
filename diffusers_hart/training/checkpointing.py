"""Crash-safe training checkpoints: `output_dir/checkpoint-<step>` folders written by `accelerator.save_state`.

A checkpoint is written into a hidden sibling folder, `.checkpoint-<step>.partial`, then a marker file
(`hart_checkpoint.json`, holding the step) is written last, and only then is the folder renamed into place with
`os.replace`, an atomic rename on one file system. So a folder named `checkpoint-<step>` with its marker is always
complete: a crash (power loss, OOM kill, SIGKILL) mid-save leaves at most a `.partial` folder, which `latest` never
picks and the next save of that step clears.

Old checkpoints are removed (`checkpoints_total_limit`) only after the new one is in place, and only folders that
carry this module's marker: a user's own `checkpoint-*` folder, or anything else in `output_dir`, is never deleted.
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple, Union

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
MARKER_FILE = "hart_checkpoint.json"
_CHECKPOINT_NAME = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")
# A leading dot keeps half-written folders out of `checkpoint-*` globs (ours and the user's shell).
_PARTIAL_NAME = ".{name}.partial"
_REPLACED_NAME = ".{name}.replaced"

PathLike = Union[str, os.PathLike]


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def read_checkpoint_step(folder: PathLike) -> Optional[int]:
    """The step recorded in `folder`'s marker, or None when `folder` is not a complete checkpoint of this module."""
    try:
        step = json.loads((Path(folder) / MARKER_FILE).read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and step >= 0 else None


def complete_checkpoints(output_dir: PathLike) -> List[Tuple[int, Path]]:
    """(step, folder) of every complete checkpoint directly under `output_dir`, oldest first.

    Complete means named `checkpoint-<step>` and holding a marker whose step matches the name; a folder copied or
    renamed by hand to another step's name does not count.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = _CHECKPOINT_NAME.match(entry.name)
        if match and entry.is_dir() and read_checkpoint_step(entry) == int(match.group(1)):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The newest complete checkpoint under `output_dir`, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume_checkpoint(output_dir: PathLike, resume_from_checkpoint: Optional[str]) -> Optional[Path]:
    """The folder `--resume_from_checkpoint` names: None (start fresh), "latest" (newest complete checkpoint under
    `output_dir`, None when there is none yet: a first run and its restarts share one command line), or a path
    (as given, else relative to `output_dir`).

    Raises:
        `ValueError`: a path that is not a complete checkpoint, with what was found instead.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    folder = Path(resume_from_checkpoint)
    if not folder.exists() and not folder.is_absolute():
        folder = Path(output_dir) / folder
    if not folder.is_dir():
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint}: no such folder (nor under {output_dir})")
    if read_checkpoint_step(folder) is None:
        raise ValueError(
            f"{folder} is not a complete checkpoint (no valid {MARKER_FILE}); it may be a save that was interrupted. "
            f"Pass 'latest' to resume from the newest complete one"
        )
    return folder


def save_checkpoint(accelerator, output_dir: PathLike, global_step: int, total_limit: Optional[int] = None) -> Path:
    """Save the training state (`accelerator.save_state`) as `output_dir/checkpoint-<global_step>`, atomically.

    Every process must call it: each writes its own RNG state into the same folder. Then the main process writes
    the marker, renames the folder into place and applies `total_limit` (keep at most that many complete
    checkpoints, the new one included; None keeps all).

    Raises:
        `ValueError`: `output_dir/checkpoint-<step>` exists and is not one of this module's checkpoints.
    """
    output_dir = Path(output_dir)
    name = checkpoint_name(global_step)
    final = output_dir / name
    partial = output_dir / _PARTIAL_NAME.format(name=name)
    if final.exists() and read_checkpoint_step(final) != global_step:
        raise ValueError(f"{final} exists and is not a checkpoint of this trainer; move it away, it is not replaced")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # left by a save of this step that crashed; it holds nothing complete
            shutil.rmtree(partial)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every process's files are written before the folder is published
    if accelerator.is_main_process:
        _write_marker(partial, global_step)
        _publish(partial, final)
        if total_limit is not None:
            remove_old_checkpoints(output_dir, total_limit)
        logger.info(f"Saved state to {final}")
    accelerator.wait_for_everyone()
    return final


def _write_marker(folder: Path, global_step: int) -> None:
    # Written last and flushed to disk: its presence says everything before it is there.
    with open(folder / MARKER_FILE, "w") as marker:
        json.dump({"global_step": global_step}, marker)
        marker.flush()
        os.fsync(marker.fileno())


def _publish(partial: Path, final: Path) -> None:
    """Rename `partial` to `final`. A complete checkpoint already there (the same step saved again after a resume)
    is moved aside first and deleted only once the new one is in place, so one complete copy exists throughout."""
    replaced = None
    if final.exists():
        replaced = final.with_name(_REPLACED_NAME.format(name=final.name))
        if replaced.exists():
            shutil.rmtree(replaced)
        os.replace(final, replaced)
    os.replace(partial, final)
    if replaced is not None:
        shutil.rmtree(replaced)


def remove_old_checkpoints(output_dir: PathLike, total_limit: int) -> List[Path]:
    """Delete the oldest complete checkpoints so that at most `total_limit` remain; returns the deleted folders."""
    if total_limit < 1:
        raise ValueError(f"checkpoints_total_limit must be at least 1, got {total_limit}")
    found = complete_checkpoints(output_dir)
    removed = [folder for _, folder in found[: max(len(found) - total_limit, 0)]]
    for folder in removed:
        logger.info(f"Removing old checkpoint {folder} (checkpoints_total_limit={total_limit})")
        shutil.rmtree(folder)
    return removed
