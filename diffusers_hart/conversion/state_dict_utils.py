"""Strict, explicit state-dict renaming used by every converter.

Converters pop each source key into its new name, so after all mappings have run the
source must be empty; anything left (or anything a mapping expected but did not find)
is an error that names the key. Nothing is silently dropped or guessed.
"""

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


def load_checkpoint_file(folder: Path, candidates: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Load the first of `candidates` found in `folder`: safetensors, or a pickle read with `weights_only=True`."""
    for name in candidates:
        path = Path(folder) / name
        if path.is_file():
            if path.suffix == ".safetensors":
                return load_file(str(path))
            return torch.load(str(path), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"none of {list(candidates)} found in {folder}")
