"""Convert the released HART tokenizer (`HARTAutoEncoderWithDisc` folder) to `HARTAutoEncoder`.

The release stores `config.json` (a transformers `HARTAutoEncoderWithDiscConfig`) and `model.safetensors` with the
autoencoder under `vae.*` and the training discriminator under `disc.*`.
"""

from pathlib import Path
from typing import Dict, Tuple, Union

import torch

from ..models.autoencoders import HARTAutoEncoder
from .state_dict_utils import (
    ensure_consumed,
    find_checkpoint_file,
    load_checkpoint_file,
    load_config_file,
    move_keys,
    move_prefixed,
)


# Original config field -> HARTAutoEncoder config field.
_CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "z_channels": "z_channels",
    "ch": "ch",
    "ch_mult": "ch_mult",
    "dropout": "dropout",
    "beta": "beta",
    "quant_conv_ks": "quant_conv_ks",
    "quant_resi": "quant_resi",
    "share_quant_resi": "share_quant_resi",
    "default_qresi_counts": "default_qresi_counts",
    "v_patch_nums": "patch_nums",
}
# Fields with no effect on the hybrid autoencoder's weights or outputs.
_IGNORED_FIELDS = {
    "levels",  # FSQ levels; no FSQ quantizer is built
    "test_mode",  # only freezes parameters / calls eval() after construction
    "freeze_codebook_for_hybrid",  # only sets requires_grad for training
    "disable_quant_resi",  # declared by the plain VAR quantizer but never read
    # transformers bookkeeping
    "architectures",
    "model_type",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
}
# Options implemented for one value only: field -> (original default, supported value, why).
_REQUIRED_VALUES = {
    "quantizer_type": ("var", "var_hybrid", "only the hybrid multi-scale quantizer is implemented"),
    "hybrid": (False, True, "only the hybrid (discrete + continuous) tokenizer is implemented"),
    "double_decoder": (False, False, "the second decoder for discrete-only reconstructions is not implemented"),
    "using_znorm": (False, False, "cosine-similarity code lookup is not implemented"),
}
# Prefix of the autoencoder weights in the state dict of each original model type.
_MODEL_TYPES = {"hart_autoencoder_with_disc": "vae.", "hart_autoencoder": ""}
# The GAN discriminator of the release, used only to train the tokenizer.
_DISCRIMINATOR_PREFIX = "disc."
# Codebook-usage EMA of the plain VAR quantizer; the hybrid quantizer never updates or reads it.
_VOCAB_HIT_EMA = "quantize.ema_vocab_hit_SV"


def _translate_config(original_config: dict) -> dict:
    model_type = original_config.get("model_type", "hart_autoencoder_with_disc")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not a HART tokenizer config (expected {list(_MODEL_TYPES)})")
    for key, (default, supported, reason) in _REQUIRED_VALUES.items():
        value = original_config.get(key, default)
        if value != supported:
            raise ValueError(f"unsupported tokenizer option {key}={value!r}: {reason}")
    config = {}
    for key, value in original_config.items():
        if key in _CONFIG_FIELDS:
            config[_CONFIG_FIELDS[key]] = list(value) if isinstance(value, (list, tuple)) else value
        elif key not in _REQUIRED_VALUES and key not in _IGNORED_FIELDS:
            raise ValueError(f"unknown tokenizer config option {key!r}")
    if any(not isinstance(pn, int) for pn in config.get("patch_nums", ())):
        raise ValueError(f"v_patch_nums must be square side lengths (ints), got {config['patch_nums']}")
    return config


def _quant_resi_names(original_config: dict, num_convs: int) -> list:
    share = original_config.get("share_quant_resi", 4)
    if share == 1:
        return [("quant_resi.qresi.", "quant_resi.0.")]
    if share == 0:
        return [(f"quant_resi.{k}.", f"quant_resi.{k}.") for k in range(num_convs)]
    return [(f"quant_resi.qresi_ls.{k}.", f"quant_resi.{k}.") for k in range(num_convs)]


def convert_tokenizer_checkpoint(
    original_config: dict, state_dict: Dict[str, torch.Tensor], checkpoint: str = "HART tokenizer checkpoint"
) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Translate the original tokenizer config and weights to `HARTAutoEncoder`'s.

    Args:
        original_config (`dict`): Content of the release's `config.json`.
        state_dict (`Dict[str, torch.Tensor]`): The release's weights (`vae.*` and `disc.*`); not modified.
        checkpoint (`str`): Where `state_dict` came from (its file), named by key errors.

    Returns:
        `(config, state_dict)` for `HARTAutoEncoder(**config).load_state_dict(state_dict, strict=True)`.

    Raises:
        `ValueError` naming an unsupported or unknown config option; `CheckpointKeyError` naming missing or
        unconsumed weights.
    """
    config = _translate_config(original_config)
    prefix = _MODEL_TYPES[original_config.get("model_type", "hart_autoencoder_with_disc")]
    source = dict(state_dict)
    if prefix:
        for key in [key for key in source if key.startswith(_DISCRIMINATOR_PREFIX)]:
            del source[key]
    source.pop(prefix + _VOCAB_HIT_EMA, None)

    with torch.device("meta"):
        reference = HARTAutoEncoder(**config)
    converted = {}
    # Encoder, decoder and the two 1:1 convs keep the original parameter names.
    for name in ("encoder", "quant_conv", "post_quant_conv", "decoder"):
        names = list(getattr(reference, name).state_dict())
        converted.update(
            move_prefixed(source, names, old_prefix=f"{prefix}{name}.", new_prefix=f"{name}.", checkpoint=checkpoint)
        )
    quantizer_keys = [(f"{prefix}quantize.embedding.weight", "quantize.embedding.weight")]
    if len(reference.quantize.quant_resi.state_dict()):
        for old, new in _quant_resi_names(original_config, len(reference.quantize.quant_resi)):
            quantizer_keys += [(f"{prefix}quantize.{old}{p}", f"quantize.{new}{p}") for p in ("weight", "bias")]
    converted.update(move_keys(source, quantizer_keys, checkpoint=checkpoint))
    ensure_consumed(source, checkpoint=checkpoint)
    return config, converted


def load_tokenizer_folder(path: Union[str, Path]) -> HARTAutoEncoder:
    """Build a `HARTAutoEncoder` (in eval mode) from a released tokenizer folder.

    The folder holds `config.json` and `model.safetensors` (or `pytorch_model.bin`).
    """
    original_config = load_config_file(Path(path) / "config.json")
    weights_file = find_checkpoint_file(path, ["model.safetensors", "pytorch_model.bin"])
    weights = load_checkpoint_file(weights_file)
    config, converted = convert_tokenizer_checkpoint(original_config, weights, checkpoint=str(weights_file))
    model = HARTAutoEncoder(**config)
    model.load_state_dict(converted, strict=True)
    return model.eval()
