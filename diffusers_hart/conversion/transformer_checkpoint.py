"""Released `llm/` folder (HARTForT2I) -> `HARTTransformer2DModel` config and weights."""

from typing import Dict, Tuple

import torch

from .diffusion_head_checkpoint import convert_diffusion_head_state_dict
from .state_dict_utils import ensure_consumed, move_keys

# Fields of HARTForT2IConfig that describe the file or pick CUDA kernels, not the function computed.
_METADATA_FIELDS = (
    "_name_or_path", "architectures", "model_type", "torch_dtype", "transformers_version", "vae_path",
    "flash_if_available", "fused_if_available",
    # The original's RMSNorm ignores its `scale` argument, so this never reaches the weights.
    "context_norm_scale",
)  # fmt: skip

# Options whose other values select code paths this port does not implement.
_REQUIRED_VALUES = {
    "attn_type": "llama",
    "mlp_type": "llama",
    "attn_l2_norm": False,
    "use_cross_attn": False,
    "sampler": "iddpm",
    "drop_rate": 0.0,
    "attn_drop_rate": 0.0,
    "drop_path_rate": 0.0,
    "diffusion_head_repeats": 1,
}


def convert_transformer_config(original: dict, vae_config: dict) -> Tuple[dict, int]:
    """Translate a HARTForT2IConfig dict. Returns `(transformer_config, num_inference_steps)`.

    Raises `ValueError` naming any option this port does not implement or does not know.
    """
    config = dict(original)
    for name in _METADATA_FIELDS:
        config.pop(name, None)
    for name, required in _REQUIRED_VALUES.items():
        value = config.pop(name, required)
        if value != required:
            raise ValueError(f"HART option {name}={value!r} is not supported by diffusers_hart (only {required!r}).")
    if config.get("context_token", 0) <= 0:
        raise ValueError("HART option context_token must be > 0: class-conditional (c2i) models are not supported.")
    disable_aln, shared_aln = config.pop("disable_aln", False), config.pop("shared_aln", False)
    if not disable_aln and shared_aln:
        raise ValueError("HART options disable_aln=False with shared_aln=True (VAR's shared AdaLN) are not supported.")
    block_conditioning = "adaln" if not disable_aln else ("adaln_single" if shared_aln else "prenorm")
    steps = str(config.pop("num_sampling_steps", "8"))
    if not steps.isdigit():
        raise ValueError(f"HART option num_sampling_steps={steps!r} is not supported (only a plain step count).")
    renamed = {
        "patch_nums": "patch_nums",
        "depth": "num_layers",
        "embed_dim": "hidden_size",
        "num_heads": "num_attention_heads",
        "mlp_ratio": "mlp_ratio",
        "context_dim": "context_dim",
        "context_token": "context_length",
        "sep_aln_pooling_mode": "adaln_pooling",
        "use_timestep_embed": "sinusoidal_level_embedding",
        "use_context_norm": "use_context_norm",
        "norm_eps": "norm_eps",
        "diff_width": "diffusion_head_width",
        "diff_depth": "diffusion_head_depth",
        "cond_drop_rate": "cond_drop_rate",
        "diffusion_batch_mul": "diffusion_batch_mul",
    }
    converted = {new: config.pop(old) for old, new in renamed.items() if old in config}
    if config:
        raise ValueError(f"Unknown HART transformer option(s): {', '.join(sorted(config))}.")
    converted["patch_nums"] = tuple(converted["patch_nums"])
    converted["block_conditioning"] = block_conditioning
    converted["vocab_size"] = vae_config["vocab_size"]
    converted["latent_channels"] = vae_config["z_channels"]
    if tuple(vae_config["patch_nums"]) != converted["patch_nums"]:
        raise ValueError(
            f"transformer patch_nums {converted['patch_nums']} differ from the tokenizer's {tuple(vae_config['patch_nums'])}"
        )
    return converted, int(steps)


def _block_mapping(index: int, block_conditioning: str):
    old, new = f"blocks.{index}.", f"transformer_blocks.{index}."
    pairs = [
        ("attn.qkv_proj.weight", "attn.to_qkv.weight"),
        ("attn.q_bias", "attn.q_bias"),
        ("attn.v_bias", "attn.v_bias"),
        ("attn.proj.weight", "attn.to_out.weight"),
        ("attn.proj.bias", "attn.to_out.bias"),
        ("ffn.gate_proj.weight", "ff.gate_proj.weight"),
        ("ffn.up_proj.weight", "ff.up_proj.weight"),
        ("ffn.down_proj.weight", "ff.down_proj.weight"),
        ("ln_wo_grad.weight", "norm.weight"),
    ]
    if block_conditioning == "adaln":
        pairs += [("ada_lin.1.weight", "adaln_linear.weight"), ("ada_lin.1.bias", "adaln_linear.bias")]
    elif block_conditioning == "adaln_single":
        pairs += [("scale_shift_table", "scale_shift_table")]
    return [(old + a, new + b) for a, b in pairs]


def convert_transformer_state_dict(state_dict: Dict[str, torch.Tensor], config: dict, checkpoint: str) -> Dict[str, torch.Tensor]:
    """Map every key of a HARTForT2I state dict; fail on a missing or an unconsumed key.

    `checkpoint` names where `state_dict` came from (its file) in those errors.
    """
    source = dict(state_dict)
    mapping = [
        ("word_embed.weight", "latent_embed.weight"),
        ("word_embed.bias", "latent_embed.bias"),
        ("context_embed.weight", "context_embed.weight"),
        ("context_embed.bias", "context_embed.bias"),
        ("head_nm.ln_wo_grad.weight", "norm_out.norm.weight"),
        ("head_nm.ada_lin.1.weight", "norm_out.linear.weight"),
        ("head_nm.ada_lin.1.bias", "norm_out.linear.bias"),
        ("head.weight", "proj_out.weight"),
        ("head.bias", "proj_out.bias"),
        ("decoder_norm.weight", "diffusion_condition_norm.weight"),
    ]
    if config["use_context_norm"]:
        mapping.append(("context_norm.weight", "context_norm.weight"))
    if config["sinusoidal_level_embedding"]:
        mapping += [
            ("lvl_embed.mlp.0.weight", "level_embed.time_embedding.linear_1.weight"),
            ("lvl_embed.mlp.0.bias", "level_embed.time_embedding.linear_1.bias"),
            ("lvl_embed.mlp.2.weight", "level_embed.time_embedding.linear_2.weight"),
            ("lvl_embed.mlp.2.bias", "level_embed.time_embedding.linear_2.bias"),
        ]
    else:
        mapping.append(("lvl_embed.weight", "level_embed.table.weight"))
    for index in range(config["num_layers"]):
        mapping += _block_mapping(index, config["block_conditioning"])
    converted = move_keys(source, mapping, checkpoint=checkpoint)
    converted.update(convert_diffusion_head_state_dict(source, checkpoint=checkpoint))

    # Buffers the original stores but this port derives: the level ids and training mask are rebuilt from
    # the config, and the k bias is identically zero.
    derived = ["lvl_1L", "attn_bias_for_masking"] + [f"blocks.{i}.attn.zero_k_bias" for i in range(config["num_layers"])]
    for key, tensor in move_keys(source, [(k, k) for k in derived if k in source], checkpoint=checkpoint).items():
        if key.endswith("zero_k_bias") and tensor.abs().max() != 0:
            raise ValueError(f"{checkpoint}: {key} is not zero; this port has no k bias")
    ensure_consumed(source, checkpoint=checkpoint)
    return converted
