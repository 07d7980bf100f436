"""The HART transformer: next-scale autoregressive prediction of the tokenizer's token pyramid.

A sequence is the text context (stage 0, `context_length` tokens) followed by the token
maps of scales 2..SN (pn x pn tokens each). Text tokens use 1-D RoPE over their position
ids; image tokens use 2-D RoPE over their (row, col) in last-scale coordinates, shifted by
the last context position id. Tokens attend to every token of their own and earlier
scales. At inference the pipeline feeds one scale per call and the keys/values of earlier
scales come from a `HARTKVCache`.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
# diffusers loads a component of a library outside diffusers by looking its base classes up by name in the module
# that `model_index.json` names: `ModelMixin` must be bound here.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.utils import BaseOutput

from ...ops import apply_rotary_emb, modulate, rms_norm
from ..embeddings import HARTLevelEmbedding, image_token_grid, image_token_positions, rotary_1d, rotary_2d
from ..modeling_utils import HARTModelMixin
from ..residual_diffusion import HARTResidualDiffusionMLP
from .kv_cache import HARTKVCache

BLOCK_CONDITIONINGS = ("adaln", "adaln_single", "prenorm")
ADALN_POOLINGS = ("max", "avg")


@dataclass
class HARTTransformerOutput(BaseOutput):
    """
    Args:
        logits (`torch.Tensor` of shape `(batch_size, num_tokens, vocab_size)`):
            Next-scale token logits of every input token.
        hidden_states (`torch.Tensor` of shape `(batch_size, num_tokens, hidden_size)`):
            Output of the last block, before the head. At the last scale it conditions the residual-diffusion head.
        kv_cache (`HARTKVCache`, *optional*):
            The cache passed in, holding this call's keys and values too.
    """

    # defaults, as diffusers' outputs have, so that accelerate's offload hooks can rebuild the output from a dict
    logits: torch.Tensor = None
    hidden_states: torch.Tensor = None
    kv_cache: Optional[HARTKVCache] = None


class HARTRMSNorm(nn.Module):
    """RMSNorm with a learnable weight (the original keeps one even where it asks for none)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.eps)


class HARTAttention(nn.Module):
    """Llama-style self-attention with q/v biases (no k bias) and the original's 0.25/sqrt(d) scale."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        # VAR's scale without qk-l2-norm; kept for parity with released weights.
        self.scale = 0.25 / self.head_dim**0.5
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.to_out = nn.Linear(dim, dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary_emb: Tuple[torch.Tensor, torch.Tensor],
        kv_cache: Optional[HARTKVCache] = None,
        layer_index: int = 0,
        attention_mask: Optional[torch.Tensor] = None,
        store_kv: bool = True,
    ) -> torch.Tensor:
        B, L, C = hidden_states.shape
        # through the module (not F.linear on its weight) so that hooks such as layerwise casting apply
        qkv = self.to_qkv(hidden_states) + torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = qkv.view(B, L, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B H L c
        query, key = apply_rotary_emb(query, key, *rotary_emb)
        if kv_cache is not None:
            key, value = kv_cache.update(layer_index, key, value, store=store_kv)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=self.scale)
        return self.to_out(out.transpose(1, 2).reshape(B, L, C))


class HARTFeedForward(nn.Module):
    """Llama SwiGLU MLP."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class HARTTransformerBlock(nn.Module):
    """Pre-norm attention + MLP block, optionally modulated by the pooled text condition.

    `conditioning`:
      * "adaln": per-block `SiLU -> Linear(C, 6C)` of the pooled condition.
      * "adaln_single": PixArt-style learned `scale_shift_table` plus the pooled condition.
      * "prenorm": no modulation.
    The modulation chunks are (gamma1, gamma2, scale1, scale2, shift1, shift2); the
    sublayer outputs are multiplied by gamma itself, not (1 + gamma), as in the original.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, norm_eps: float, conditioning: str):
        super().__init__()
        self.conditioning = conditioning
        self.norm = HARTRMSNorm(dim, norm_eps)  # one norm serves both sublayers, as in the original
        self.attn = HARTAttention(dim, num_heads)
        self.ff = HARTFeedForward(dim, mlp_hidden_dim)
        if conditioning == "adaln":
            self.adaln_linear = nn.Linear(dim, 6 * dim)
        elif conditioning == "adaln_single":
            self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))

    def modulation(self, pooled_condition_BD: torch.Tensor) -> torch.Tensor:
        """(B, 6, C) modulation of this block from the pooled condition."""
        B, C = pooled_condition_BD.shape
        if self.conditioning == "adaln":
            return self.adaln_linear(F.silu(pooled_condition_BD)).view(B, 6, C)
        return self.scale_shift_table[None] + pooled_condition_BD[:, None]

    def forward(
        self,
        hidden_states: torch.Tensor,
        pooled_condition: Optional[torch.Tensor],
        rotary_emb: Tuple[torch.Tensor, torch.Tensor],
        kv_cache: Optional[HARTKVCache] = None,
        layer_index: int = 0,
        attention_mask: Optional[torch.Tensor] = None,
        store_kv: bool = True,
    ) -> torch.Tensor:
        attn_kwargs = dict(
            rotary_emb=rotary_emb, kv_cache=kv_cache, layer_index=layer_index, attention_mask=attention_mask,
            store_kv=store_kv,
        )  # fmt: skip
        if self.conditioning == "prenorm":
            hidden_states = hidden_states + self.attn(self.norm(hidden_states), **attn_kwargs)
            return hidden_states + self.ff(self.norm(hidden_states))
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(pooled_condition).unsqueeze(2).unbind(1)
        attn_out = self.attn(modulate(self.norm(hidden_states), scale1, shift1), **attn_kwargs)
        hidden_states = hidden_states + attn_out * gamma1
        ff_out = self.ff(modulate(self.norm(hidden_states), scale2, shift2))
        return hidden_states + ff_out * gamma2


class HARTAdaLayerNormOut(nn.Module):
    """Final norm modulated by the max-pooled condition: `norm(x) * (1 + scale) + shift`."""

    def __init__(self, dim: int, norm_eps: float):
        super().__init__()
        self.norm = HARTRMSNorm(dim, norm_eps)
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, hidden_states: torch.Tensor, condition_BLD: torch.Tensor) -> torch.Tensor:
        pooled = condition_BLD.max(dim=1).values
        scale, shift = self.linear(F.silu(pooled)).view(-1, 2, hidden_states.shape[-1]).unsqueeze(2).unbind(1)
        return modulate(self.norm(hidden_states), scale, shift)


def pool_condition(condition_BLD: torch.Tensor, mask_BL: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool the embedded context over its tokens: "max" ignores the mask, "avg" is a masked mean."""
    if mode == "max":
        return condition_BLD.max(dim=1).values
    mask = mask_BL.unsqueeze(-1).to(condition_BLD.dtype)
    # divide before summing, as the original does, so rounding matches
    return (condition_BLD * mask / mask.sum(dim=1, keepdim=True).clamp(min=1)).sum(dim=1)


class HARTTransformer2DModel(HARTModelMixin, ConfigMixin):
    r"""
    The HART text-to-image transformer with its residual-diffusion head.

    Args:
        patch_nums (`Tuple[int]`): Side of the token map of each scale, smallest first (the first is the text context stage).
        num_layers (`int`): Number of transformer blocks.
        hidden_size (`int`): Token width C.
        num_attention_heads (`int`): Attention heads; `hidden_size / num_attention_heads` must be divisible by 4 (2-D RoPE).
        mlp_ratio (`float`): MLP width ratio; the SwiGLU hidden size is `int(C * mlp_ratio * 2/3 + 255) // 256 * 256`.
        context_dim (`int`): Width of the text-encoder hidden states.
        context_length (`int`): Number of text tokens (prompt tokens after the system prompt, padded/truncated).
        vocab_size (`int`): Size of the tokenizer's codebook.
        latent_channels (`int`): Channels of the tokenizer's latent (codebook vector width).
        block_conditioning (`str`): "adaln", "adaln_single" or "prenorm" (see `HARTTransformerBlock`).
        adaln_pooling (`str`): How "adaln" blocks pool the context: "max" (over all tokens, mask ignored) or "avg" (masked mean).
            "adaln_single" always uses the masked mean.
        sinusoidal_level_embedding (`bool`): Sinusoid + MLP level embedding instead of a table.
        use_context_norm (`bool`): RMS-normalise the text hidden states before `context_embed`.
        norm_eps (`float`): Epsilon of every RMSNorm.
        rope_theta (`float`): RoPE base of text and image tokens.
        diffusion_head_width (`int`), diffusion_head_depth (`int`): Width and residual blocks of the diffusion MLP.
        residual_scale (`float`): The diffusion head models `residual / residual_scale`.
        cond_drop_rate (`float`), diffusion_batch_mul (`int`): Training settings kept with the model, as the original does.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["HARTTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_nums: Tuple[int, ...] = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
        num_layers: int = 24,
        hidden_size: int = 1536,
        num_attention_heads: int = 24,
        mlp_ratio: float = 4.0,
        context_dim: int = 1536,
        context_length: int = 300,
        vocab_size: int = 4096,
        latent_channels: int = 32,
        block_conditioning: str = "adaln",
        adaln_pooling: str = "max",
        sinusoidal_level_embedding: bool = True,
        use_context_norm: bool = True,
        norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        diffusion_head_width: int = 1024,
        diffusion_head_depth: int = 6,
        residual_scale: float = 0.6,
        cond_drop_rate: float = 0.1,
        diffusion_batch_mul: int = 4,
    ):
        super().__init__()
        if block_conditioning not in BLOCK_CONDITIONINGS:
            raise ValueError(f"block_conditioning must be one of {BLOCK_CONDITIONINGS}, got {block_conditioning!r}")
        if adaln_pooling not in ADALN_POOLINGS:
            raise ValueError(f"adaln_pooling must be one of {ADALN_POOLINGS}, got {adaln_pooling!r}")
        if hidden_size % num_attention_heads or (hidden_size // num_attention_heads) % 4:
            raise ValueError(
                f"hidden_size {hidden_size} / num_attention_heads {num_attention_heads} must give a head_dim divisible by 4"
            )
        self.gradient_checkpointing = False
        self.head_dim = hidden_size // num_attention_heads
        mlp_hidden_dim = int(hidden_size * mlp_ratio * 2 / 3 + 255) // 256 * 256

        # 1. inputs: text context, token maps, scale levels
        self.context_norm = HARTRMSNorm(context_dim, norm_eps) if use_context_norm else nn.Identity()
        self.context_embed = nn.Linear(context_dim, hidden_size)
        self.latent_embed = nn.Linear(latent_channels, hidden_size)
        self.level_embed = HARTLevelEmbedding(len(patch_nums), hidden_size, sinusoidal_level_embedding)

        # 2. blocks
        self.transformer_blocks = nn.ModuleList(
            [
                HARTTransformerBlock(hidden_size, num_attention_heads, mlp_hidden_dim, norm_eps, block_conditioning)
                for _ in range(num_layers)
            ]
        )

        # 3. token head and residual-diffusion head
        self.norm_out = HARTAdaLayerNormOut(hidden_size, norm_eps)
        self.proj_out = nn.Linear(hidden_size, vocab_size)
        self.diffusion_condition_norm = HARTRMSNorm(hidden_size, norm_eps)
        self.diffusion_head = HARTResidualDiffusionMLP(
            in_channels=latent_channels,
            model_channels=diffusion_head_width,
            out_channels=2 * latent_channels,
            condition_channels=hidden_size,
            num_res_blocks=diffusion_head_depth,
        )

        stage_lengths = [context_length] + [pn * pn for pn in patch_nums[1:]]
        self.stage_starts = [sum(stage_lengths[:i]) for i in range(len(stage_lengths) + 1)]
        level_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(stage_lengths)])
        self.register_buffer("level_ids", level_ids, persistent=False)
        image_grid, image_grid_side = image_token_grid(patch_nums)
        self.register_buffer("image_grid", image_grid, persistent=False)
        self.register_buffer("image_grid_side", image_grid_side, persistent=False)

    @property
    def num_stages(self) -> int:
        return len(self.config.patch_nums)

    @property
    def sequence_length(self) -> int:
        """Tokens of a full pyramid: the context plus every image scale after the first."""
        return self.stage_starts[-1]

    def init_kv_cache(self, batch_size: int, device=None, dtype=None) -> HARTKVCache:
        """An empty cache for a whole generation of `batch_size` rows.

        It holds every stage but the last: no later stage reads the last one's keys and values (42% of the pyramid
        at the release's size), so the last stage attends to them without storing them.
        """
        return HARTKVCache(
            self.config.num_layers,
            batch_size,
            self.config.num_attention_heads,
            self.head_dim,
            self.stage_starts[-2],
            device=device or self.device,
            dtype=dtype or self.dtype,
        )

    def embed_context(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, ctx, context_dim) text hidden states -> (B, ctx, C) condition tokens."""
        return self.context_embed(self.context_norm(encoder_hidden_states.to(self.dtype)))

    def residual_condition(self, hidden_states: torch.Tensor, token_vectors: torch.Tensor) -> torch.Tensor:
        """Condition of the diffusion head: last-scale hidden states plus the embedded sampled code vectors."""
        return self.diffusion_condition_norm(hidden_states + self.latent_embed(token_vectors))

    def _image_rotary(self, image_slice: slice, offset_B, keep=None):
        grid_L2, side_L = self.image_grid[image_slice], self.image_grid_side[image_slice]
        positions = image_token_positions(grid_L2, side_L, self.config.patch_nums[-1]).unsqueeze(0) + offset_B.view(-1, 1, 1)
        if keep is not None:
            positions = positions[keep].view(offset_B.shape[0], -1, 2)
        return rotary_2d(positions, self.head_dim, self.config.rope_theta)

    def _training_attention_mask(self, level_ids_L: torch.Tensor, dtype) -> torch.Tensor:
        """Additive mask: a token sees every token of its own and earlier levels."""
        visible = level_ids_L[:, None] >= level_ids_L[None, :]
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))

    def forward(
        self,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        encoder_position_ids: torch.Tensor,
        latent_tokens: Optional[torch.Tensor] = None,
        stage_index: Optional[int] = None,
        kv_cache: Optional[HARTKVCache] = None,
        last_scale_keep: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ):
        """
        Args:
            encoder_hidden_states (`torch.Tensor` of shape `(B, context_length, context_dim)`): Text hidden states.
            encoder_attention_mask (`torch.Tensor` of shape `(B, context_length)`): True on real (non-pad) text tokens.
                Only the pooled conditions use it: every token, pads included, is attended to, as in the original.
            encoder_position_ids (`torch.Tensor` of shape `(B, context_length)`): Text RoPE positions; the last one
                also offsets every image token's 2-D position.
            latent_tokens (`torch.Tensor` of shape `(B, l, latent_channels)`, *optional*):
                With `stage_index >= 1`: the input token map of that scale (the quantizer's next input, flattened).
                With `stage_index=None` (training): the teacher-forcing input of scales 2..SN.
            stage_index (`int`, *optional*): Scale to process with the KV cache (0 = the context). `None` runs the
                whole pyramid with a block-causal mask.
            kv_cache (`HARTKVCache`, *optional*): Required with `stage_index`; the keys/values of earlier scales.
            last_scale_keep (`torch.Tensor` of shape `(B, pn_last**2)`, *optional*): Training only: which last-scale
                tokens to keep (the same number per row); the others are dropped from the sequence.
        """
        B = encoder_hidden_states.shape[0]
        condition_BLD = self.embed_context(encoder_hidden_states)
        offset_B = encoder_position_ids[:, -1]
        attention_mask = None

        # 1. input tokens and their rotary tables
        if stage_index is None:
            tokens = torch.cat((condition_BLD, self.latent_embed(latent_tokens)), dim=1)
            keep = None
            if last_scale_keep is not None:
                keep = torch.cat(
                    (torch.ones(B, tokens.shape[1] - last_scale_keep.shape[1], dtype=torch.bool, device=tokens.device),
                     last_scale_keep.bool()),
                    dim=1,
                )
                tokens = tokens[keep].view(B, -1, tokens.shape[-1])
            num_tokens = tokens.shape[1]
            level_ids = self.level_ids[:num_tokens]
            tokens = tokens + self.level_embed(level_ids, tokens.dtype)
            cos_c, sin_c = rotary_1d(encoder_position_ids, self.head_dim, self.config.rope_theta)
            image_keep = None if keep is None else keep[:, self.config.context_length :]
            cos_i, sin_i = self._image_rotary(slice(None), offset_B, image_keep)
            rotary_emb = (torch.cat((cos_c, cos_i), dim=1), torch.cat((sin_c, sin_i), dim=1))
            attention_mask = self._training_attention_mask(level_ids, tokens.dtype)
        else:
            if kv_cache is None:
                raise ValueError("stage-by-stage inference (stage_index set) needs a kv_cache")
            start, end = self.stage_starts[stage_index], self.stage_starts[stage_index + 1]
            # one level per stage: embed it once and broadcast, not once per token (4096 at the last stage)
            level_embedding = self.level_embed(self.level_ids[start : start + 1], condition_BLD.dtype)
            if stage_index == 0:
                tokens = condition_BLD + level_embedding
                rotary_emb = rotary_1d(encoder_position_ids, self.head_dim, self.config.rope_theta)
            else:
                tokens = self.latent_embed(latent_tokens) + level_embedding
                ctx = self.config.context_length
                rotary_emb = self._image_rotary(slice(start - ctx, end - ctx), offset_B)

        # 2. blocks
        pooling = "avg" if self.config.block_conditioning == "adaln_single" else self.config.adaln_pooling
        pooled = pool_condition(condition_BLD, encoder_attention_mask, pooling)
        hidden_states = tokens
        store_kv = stage_index is not None and stage_index < self.num_stages - 1
        for layer_index, block in enumerate(self.transformer_blocks):
            args = (hidden_states, pooled, rotary_emb, kv_cache, layer_index, attention_mask, store_kv)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, *args)
            else:
                hidden_states = block(*args)
        if store_kv:
            kv_cache.advance(hidden_states.shape[1])

        # 3. head
        # logits leave in float32: CFG mixing and sampling of a low-precision model stay accurate
        logits = self.proj_out(self.norm_out(hidden_states, condition_BLD)).float()
        if not return_dict:
            return logits, hidden_states, kv_cache
        return HARTTransformerOutput(logits=logits, hidden_states=hidden_states, kv_cache=kv_cache)
