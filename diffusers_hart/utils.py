"""Small helpers every floor of the package may use: dtype names and local-path checks."""

import os
from pathlib import Path
from typing import Union

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def names_local_path(name: Union[str, os.PathLike]) -> bool:
    """Whether `name` is meant as a local path rather than a Hub repo id.

    True for absolute paths, paths starting with `./`, `../` or `~`, and paths whose parent folder exists
    (`runs/model` next to an existing `runs/`); a Hub id like `user/model` has none of these.
    """
    text = os.fspath(name)
    if os.path.isabs(text) or text.startswith(("./", "../", "~", ".\\", "..\\")) or text in (".", ".."):
        return True
    parent = os.path.dirname(text)
    return bool(parent) and os.path.isdir(parent)


def existing_folder(path: Union[str, os.PathLike]) -> Path:
    """`path` as a `Path` if it is an existing folder; `FileNotFoundError("no such folder: PATH")` otherwise."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {path}")
    return folder
