"""Strict, explicit state-dict renaming used by every converter, and the loaders of a release's files.

Converters pop each source key into its new name, so after all mappings have run the
source must be empty; anything left (or anything a mapping expected but did not find)
is an error that names the key and the file it was read from. Nothing is silently dropped or guessed.
A file that cannot be read is an error that names the file.
"""

import json
from pathlib import Path
from typing import Dict, Iterable, MutableMapping, Sequence, Tuple

import torch
from safetensors.torch import load_file


class CheckpointKeyError(KeyError):
    """A checkpoint misses keys the target model needs, or holds keys no mapping consumes."""

    def __str__(self) -> str:  # KeyError quotes its message; show it as written
        return str(self.args[0])


def move_keys(
    source: MutableMapping[str, torch.Tensor],
    mapping: Iterable[Tuple[str, str]],
    *,
    checkpoint: str,
) -> Dict[str, torch.Tensor]:
    """Pop every `old` key of `mapping` out of `source` and return `{new: tensor}`.

    Raises `CheckpointKeyError` listing every `old` key that `source` lacks.
    """
    moved, missing = {}, []
    for old, new in mapping:
        if old in source:
            moved[new] = source.pop(old)
        else:
            missing.append(old)
    if missing:
        raise CheckpointKeyError(
            f"{checkpoint} is missing {len(missing)} key(s) the model needs: {', '.join(missing[:20])}"
            + (" ..." if len(missing) > 20 else "")
        )
    return moved


def move_prefixed(
    source: MutableMapping[str, torch.Tensor],
    names: Iterable[str],
    *,
    old_prefix: str,
    new_prefix: str,
    checkpoint: str,
) -> Dict[str, torch.Tensor]:
    """`move_keys` for a submodule whose parameter names are kept and only the prefix changes."""
    return move_keys(source, [(old_prefix + n, new_prefix + n) for n in names], checkpoint=checkpoint)


def ensure_consumed(source: MutableMapping[str, torch.Tensor], *, checkpoint: str) -> None:
    """Raise `CheckpointKeyError` if any key of `source` was not mapped."""
    if source:
        keys = sorted(source)
        raise CheckpointKeyError(
            f"{checkpoint} holds {len(keys)} key(s) no mapping consumes: {', '.join(keys[:20])}"
            + (" ..." if len(keys) > 20 else "")
        )


def find_checkpoint_file(folder: Path, candidates: Sequence[str]) -> Path:
    """The first of the file names `candidates` present in `folder`."""
    for name in candidates:
        path = Path(folder) / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"none of {list(candidates)} found in {folder}")


def load_checkpoint_file(path: Path) -> Dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a pickle read with `weights_only=True`.

    Raises `ValueError` naming the file if it cannot be read: the loaders raise assorted types for a truncated or
    corrupt file (safetensors' `SafetensorError`, pickle and zip errors from `torch.load`) and none names it.
    """
    try:
        if Path(path).suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read the checkpoint file {path}: {error}") from error


def load_config_file(path: Path) -> dict:
    """A release's `config.json`; raises `ValueError` naming the file if it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"cannot read the config file {path}: {error}") from error
