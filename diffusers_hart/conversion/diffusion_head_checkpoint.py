"""Key mapping of HART's diffusion head (`diffloss.net.*`) onto `HARTResidualDiffusionMLP`."""

import re
from typing import Dict, MutableMapping

import torch

from .state_dict_utils import CheckpointKeyError, move_keys


def _linear(old: str, new: str):
    return [(f"{old}.weight", f"{new}.weight"), (f"{old}.bias", f"{new}.bias")]


def convert_diffusion_head_state_dict(
    state_dict: MutableMapping[str, torch.Tensor],
    prefix: str = "diffloss.net.",
    target_prefix: str = "diffusion_head.",
    checkpoint: str = "HART checkpoint",
) -> Dict[str, torch.Tensor]:
    """
    Pops every key of HART's diffusion head out of `state_dict` and returns them under `HARTResidualDiffusionMLP`'s
    names, prefixed by `target_prefix`.

    The number of residual blocks is read from the keys; a block with any parameter missing raises
    `CheckpointKeyError`. Keys outside `prefix` are left in `state_dict` for the caller's other mappings, so this does
    not check that the checkpoint is fully consumed. `checkpoint` names where `state_dict` came from (its file) in
    errors.
    """
    block_pattern = re.compile(re.escape(prefix) + r"res_blocks\.(\d+)\.")
    block_ids = {int(m.group(1)) for m in map(block_pattern.match, state_dict) if m}
    if not block_ids:
        raise CheckpointKeyError(f"{checkpoint} has no diffusion-head residual blocks under {prefix!r}")

    mapping = _linear("time_embed.mlp.0", "time_embedding.linear_1")
    mapping += _linear("time_embed.mlp.2", "time_embedding.linear_2")
    mapping += _linear("cond_embed", "condition_proj") + _linear("input_proj", "proj_in")
    for i in range(max(block_ids) + 1):
        block = f"res_blocks.{i}"
        mapping += _linear(f"{block}.in_ln", f"{block}.norm")
        mapping += _linear(f"{block}.mlp.0", f"{block}.linear_1") + _linear(f"{block}.mlp.2", f"{block}.linear_2")
        mapping += _linear(f"{block}.adaLN_modulation.1", f"{block}.modulation")
    mapping += _linear("final_layer.adaLN_modulation.1", "modulation_out") + _linear("final_layer.linear", "proj_out")
    return move_keys(
        state_dict,
        [(prefix + old, target_prefix + new) for old, new in mapping],
        checkpoint=f"{checkpoint} (diffusion head, {prefix}*)",
    )
