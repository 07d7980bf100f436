"""Crash-safe checkpoints (`diffusers_hart.training.checkpointing`) on a one-layer model: a SIGKILL in the middle of
`accelerator.save_state` leaves the previous checkpoint complete and `latest` on it; old checkpoints go only after
the new one is complete; nothing that is not a checkpoint of the trainer is deleted or picked."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from diffusers_hart.training.checkpointing import (
    MARKER_FILE,
    complete_checkpoints,
    latest_checkpoint,
    remove_old_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Run in a child process: save checkpoint-1 with weights 1.0, then start checkpoint-2 with weights 2.0 and stop
# for good right after accelerate has written the first file of that save (its model weights), as a machine that
# loses power or is OOM-killed mid-save would. The parent SIGKILLs it there.
_CHILD = r"""
import sys, time
from pathlib import Path
import torch
import accelerate.checkpointing
from accelerate import Accelerator
from diffusers_hart.training.checkpointing import save_checkpoint

output_dir, ready = Path(sys.argv[1]), Path(sys.argv[2])
accelerator = Accelerator()
model = accelerator.prepare(torch.nn.Linear(4, 4))
torch.nn.init.constant_(model.weight, 1.0)
save_checkpoint(accelerator, output_dir, 1)

real_save = accelerate.checkpointing.save
def save_then_hang(obj, path, *args, **kwargs):
    real_save(obj, path, *args, **kwargs)
    ready.write_text(str(path))
    time.sleep(600)
accelerate.checkpointing.save = save_then_hang
torch.nn.init.constant_(model.weight, 2.0)
save_checkpoint(accelerator, output_dir, 2)
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


def _accelerator_and_model():
    accelerator = Accelerator()
    model = accelerator.prepare(torch.nn.Linear(4, 4))
    return accelerator, model


def _fake_checkpoint(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    (folder / MARKER_FILE).write_text(json.dumps({"global_step": step}))
    return folder


def test_sigkill_during_save_leaves_previous_checkpoint_as_latest(tmp_path):
    output_dir, ready = tmp_path / "run", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(output_dir), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, "the child ended before reaching the save"
            assert time.monotonic() < deadline, "the child never reached the save"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL

    # the interrupted save left files, but only in its hidden partial folder, without a marker
    partial = output_dir / ".checkpoint-2.partial"
    assert Path(ready.read_text()).parent == partial
    assert any(partial.iterdir()) and not (partial / MARKER_FILE).exists()
    assert not (output_dir / "checkpoint-2").exists()
    assert latest_checkpoint(output_dir) == output_dir / "checkpoint-1"
    assert resolve_resume_checkpoint(output_dir, "latest") == output_dir / "checkpoint-1"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume_checkpoint(output_dir, str(partial))

    # the previous checkpoint loads, with its own weights
    accelerator, model = _accelerator_and_model()
    accelerator.load_state(str(latest_checkpoint(output_dir)))
    assert torch.equal(model.weight, torch.ones(4, 4))

    # the next save of step 2 clears the stale partial folder and publishes a complete checkpoint
    save_checkpoint(accelerator, output_dir, 2)
    assert not partial.exists()
    assert latest_checkpoint(output_dir) == output_dir / "checkpoint-2"


def test_total_limit_removes_oldest_after_the_new_one_is_complete(tmp_path, monkeypatch):
    accelerator, _ = _accelerator_and_model()
    for step in (1, 2, 3):
        save_checkpoint(accelerator, tmp_path, step, total_limit=2)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [2, 3]

    # a save that fails leaves every existing checkpoint in place, whatever the limit
    def failing_save_state(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(accelerator, "save_state", failing_save_state)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(accelerator, tmp_path, 4, total_limit=1)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [2, 3]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"


def test_only_marked_checkpoints_count_and_are_deleted(tmp_path):
    user_folder = tmp_path / "checkpoint-99"  # the user's, or a copy without marker: neither latest nor deleted
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("mine")
    renamed = _fake_checkpoint(tmp_path / "checkpoint-50", 5)  # a marker of another step: not a checkpoint-50
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}", step)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    removed = remove_old_checkpoints(tmp_path, 1)
    assert removed == [tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"]
    assert user_folder.exists() and renamed.exists() and (tmp_path / "checkpoint-3").exists()


def test_save_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path):
    accelerator, _ = _accelerator_and_model()
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "checkpoint-7" / "data.bin").write_bytes(b"user data")
    with pytest.raises(ValueError, match="not a checkpoint of this trainer"):
        save_checkpoint(accelerator, tmp_path, 7)
    assert (tmp_path / "checkpoint-7" / "data.bin").read_bytes() == b"user data"


def test_saving_a_step_again_replaces_its_checkpoint(tmp_path):
    accelerator, model = _accelerator_and_model()
    torch.nn.init.constant_(model.weight, 1.0)
    save_checkpoint(accelerator, tmp_path, 5)
    torch.nn.init.constant_(model.weight, 3.0)
    save_checkpoint(accelerator, tmp_path, 5)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-5"]
    torch.nn.init.zeros_(model.weight)
    accelerator.load_state(str(tmp_path / "checkpoint-5"))
    assert torch.equal(model.weight, torch.full((4, 4), 3.0))


def test_resolve_resume_checkpoint(tmp_path):
    assert resolve_resume_checkpoint(tmp_path, None) is None
    assert resolve_resume_checkpoint(tmp_path, "latest") is None  # nothing yet: a fresh start
    _fake_checkpoint(tmp_path / "checkpoint-4", 4)
    assert resolve_resume_checkpoint(tmp_path, "checkpoint-4") == tmp_path / "checkpoint-4"  # relative to output_dir
    with pytest.raises(ValueError, match="no such folder"):
        resolve_resume_checkpoint(tmp_path, "checkpoint-8")
