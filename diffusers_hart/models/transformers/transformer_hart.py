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
from diffusers.loaders import PeftAdapterMixin
# diffusers loads a component of a library outside diffusers by looking its base classes up by name in the module
# that `model_index.json` names: `ModelMixin` must be bound here.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.utils import BaseOutput

from ...ops import apply_rotary_emb, rms_norm, rms_norm_modulate, swiglu
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


@dataclass
class HARTPromptCondition:
    """
    Everything the stage-by-stage forward needs from the text context: it depends on the prompt alone, so one
    generation computes it once (`HARTTransformer2DModel.prepare_condition`) instead of once per scale.

    Args:
        tokens (`torch.Tensor` of shape `(B, context_length, hidden_size)`): The embedded context (stage 0's input).
        pooled (`torch.Tensor` of shape `(B, hidden_size)`): The context pooled for the blocks' modulation.
        block_modulation (`torch.Tensor` of shape `(num_layers, B, 6, hidden_size)`, *optional*): Every block's
            (gamma1, gamma2, scale1, scale2, shift1, shift2); `None` for "prenorm" blocks.
        output_modulation (`torch.Tensor` of shape `(B, 2, hidden_size)`): (scale, shift) of the output norm.
        position_offset (`torch.Tensor` of shape `(B,)`): The last context position id, added to every image
            token's 2-D position.
        text_rotary (`Tuple[torch.Tensor, torch.Tensor]`, each `(B, context_length, head_dim)`): The context's RoPE
            cos and sin.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    block_modulation: Optional[torch.Tensor]
    output_modulation: torch.Tensor
    position_offset: torch.Tensor
    text_rotary: Tuple[torch.Tensor, torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def _tensors(self):
        return (self.tokens, self.pooled, self.block_modulation, self.output_modulation, self.position_offset,
                *self.text_rotary)  # fmt: skip

    def clone(self) -> "HARTPromptCondition":
        """A copy in new memory, e.g. the static buffers a CUDA graph reads."""
        tokens, pooled, block, output, offset, cos, sin = (None if t is None else t.clone() for t in self._tensors())
        return HARTPromptCondition(tokens, pooled, block, output, offset, (cos, sin))

    def copy_(self, other: "HARTPromptCondition") -> "HARTPromptCondition":
        """Overwrite these tensors in place with `other`'s (same shapes), keeping their addresses."""
        for mine, theirs in zip(self._tensors(), other._tensors()):
            if mine is not None:
                mine.copy_(theirs)
        return self


def _call_under_offload_hook(module: nn.Module, method, *args):
    """`method(*args)` of `module`, run as `module(...)` would run under an accelerate hook.

    Offloading hooks wrap `forward` only: under sequential offload a module's own parameters (the "adaln_single"
    table) live on the meta device outside it, and under model offload the whole model sits on the CPU until its
    first forward. diffusers' `apply_forward_hook` does the first half (onload); the weights go back after, too.
    """
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return method(*args)
    args, _ = hook.pre_forward(module, *args)
    return hook.post_forward(module, method(*args))


class HARTRMSNorm(nn.Module):
    """RMSNorm with a learnable weight (the original keeps one even where it asks for none)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, hidden_states: torch.Tensor, scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """RMSNorm, then AdaLN modulation `* (1 + scale) + shift` when given, in one fused op on CUDA.

        Through the module (not `rms_norm` on its weight) so that offload and casting hooks apply.
        """
        if scale is None:
            return rms_norm(hidden_states, self.weight, self.eps)
        return rms_norm_modulate(hidden_states, self.weight, self.eps, scale, shift)


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
        return self.down_proj(swiglu(self.gate_proj(hidden_states), self.up_proj(hidden_states)))


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
        modulation: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """`modulation`: this block's (B, 6, C) modulation computed ahead (see `HARTPromptCondition`); without it,
        it is computed from `pooled_condition`."""
        attn_kwargs = dict(
            rotary_emb=rotary_emb, kv_cache=kv_cache, layer_index=layer_index, attention_mask=attention_mask,
            store_kv=store_kv,
        )  # fmt: skip
        if self.conditioning == "prenorm":
            hidden_states = hidden_states + self.attn(self.norm(hidden_states), **attn_kwargs)
            return hidden_states + self.ff(self.norm(hidden_states))
        if modulation is None:
            modulation = self.modulation(pooled_condition)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = modulation.unsqueeze(2).unbind(1)
        attn_out = self.attn(self.norm(hidden_states, scale1, shift1), **attn_kwargs)
        hidden_states = hidden_states + attn_out * gamma1
        ff_out = self.ff(self.norm(hidden_states, scale2, shift2))
        return hidden_states + ff_out * gamma2


class HARTAdaLayerNormOut(nn.Module):
    """Final norm modulated by the max-pooled condition: `norm(x) * (1 + scale) + shift`."""

    def __init__(self, dim: int, norm_eps: float):
        super().__init__()
        self.norm = HARTRMSNorm(dim, norm_eps)
        self.linear = nn.Linear(dim, 2 * dim)

    def modulation(self, condition_BLD: torch.Tensor) -> torch.Tensor:
        """(B, 2, C) scale and shift from the condition tokens, max-pooled over all of them."""
        pooled = condition_BLD.max(dim=1).values
        return self.linear(F.silu(pooled)).view(pooled.shape[0], 2, -1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        condition_BLD: Optional[torch.Tensor] = None,
        modulation: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Give the condition tokens `condition_BLD`, or their `modulation` computed ahead."""
        if modulation is None:
            modulation = self.modulation(condition_BLD)
        scale, shift = modulation.unsqueeze(2).unbind(1)
        return self.norm(hidden_states, scale, shift)


def _keep_last_scale(sequence_BLC: torch.Tensor, kept_positions_BK: torch.Tensor, num_last: int) -> torch.Tensor:
    """Drop entries of the last scale from a sequence that ends with its `num_last` rows: every earlier row, then the
    rows at `kept_positions_BK` (B, K) of the last scale, in that order.

    A gather of a size known on the host: boolean-mask indexing would have to read the number kept off the device.
    """
    B, L, C = sequence_BLC.shape
    kept_rows = kept_positions_BK.to(sequence_BLC.device).long() + (L - num_last)
    kept_BKC = sequence_BLC.gather(1, kept_rows.unsqueeze(-1).expand(B, -1, C))
    return torch.cat((sequence_BLC[:, : L - num_last], kept_BKC), dim=1)


def pool_condition(condition_BLD: torch.Tensor, mask_BL: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool the embedded context over its tokens: "max" ignores the mask, "avg" is a masked mean."""
    if mode == "max":
        return condition_BLD.max(dim=1).values
    mask = mask_BL.unsqueeze(-1).to(condition_BLD.dtype)
    # divide before summing, as the original does, so rounding matches
    return (condition_BLD * mask / mask.sum(dim=1, keepdim=True).clamp(min=1)).sum(dim=1)


class HARTTransformer2DModel(HARTModelMixin, ConfigMixin, PeftAdapterMixin):
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

    LoRA: `PeftAdapterMixin` gives `add_adapter(LoraConfig(...))`, `save_lora_adapter(folder)` and
    `load_lora_adapter(folder, prefix=None, use_safetensors=True)` (the saved keys carry no "transformer." prefix).
    The attention (`to_qkv`, `to_out`) and MLP (`gate_proj`, `up_proj`, `down_proj`) projections are plain
    `nn.Linear` layers for peft to wrap.
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
        # (device, dtype) -> additive block-causal mask of the whole pyramid, built on first use (see
        # `_block_causal_mask`); not a buffer, since every compute dtype needs its own and none belongs in a checkpoint
        self._block_causal_masks = {}

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

    def _image_rotary(self, image_slice: slice, offset_B, kept_positions=None):
        grid_L2, side_L = self.image_grid[image_slice], self.image_grid_side[image_slice]
        positions = image_token_positions(grid_L2, side_L, self.config.patch_nums[-1]).unsqueeze(0) + offset_B.view(-1, 1, 1)
        if kept_positions is not None:
            positions = _keep_last_scale(positions, kept_positions, self.config.patch_nums[-1] ** 2)
        return rotary_2d(positions, self.head_dim, self.config.rope_theta)

    def _block_causal_mask(self, num_tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Additive (num_tokens, num_tokens) mask of the first `num_tokens` tokens of the pyramid: a token sees every
        token of its own and earlier levels.

        One mask of the whole pyramid is cached per (device, dtype), and a call gets a view of its top-left block:
        dropping last-scale tokens leaves a prefix of the levels, so every sequence length, whatever the mask ratio,
        shares the one mask (a cache keyed on the length would add an entry per kept count). Its rows are padded to a
        multiple of 16 elements so that the view keeps the row alignment memory-efficient attention wants; an
        unaligned mask is padded into a new tensor by `scaled_dot_product_attention` in every layer of every step.
        """
        key = (device, dtype)
        if key not in self._block_causal_masks:
            level_ids = self.level_ids.to(device)
            num_total = level_ids.shape[0]
            padded = torch.zeros(num_total, -(-num_total // 16) * 16, dtype=dtype, device=device)
            hidden = level_ids[:, None] < level_ids[None, :]
            self._block_causal_masks[key] = padded[:, :num_total].masked_fill_(hidden, float("-inf"))
        return self._block_causal_masks[key][:num_tokens, :num_tokens]

    def prepare_condition(
        self,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        encoder_position_ids: torch.Tensor,
    ) -> HARTPromptCondition:
        """The prompt-only inputs of stage-by-stage inference, computed once per generation (see `forward`'s
        `condition`): the embedded context, its pooled form, every block's modulation, the output norm's scale and
        shift, the image-position offset and the text RoPE tables. Arguments as in `forward`."""
        # under model CPU offload the pipeline calls this before the first forward has brought the weights over
        return _call_under_offload_hook(
            self, self._prepare_condition, encoder_hidden_states, encoder_attention_mask, encoder_position_ids
        )

    def _prepare_condition(self, encoder_hidden_states, encoder_attention_mask, encoder_position_ids):
        condition_BLD = self.embed_context(encoder_hidden_states)
        pooling = "avg" if self.config.block_conditioning == "adaln_single" else self.config.adaln_pooling
        pooled = pool_condition(condition_BLD, encoder_attention_mask, pooling)
        block_modulation = None
        if self.config.block_conditioning != "prenorm":
            # block by block, as a stage would compute them (one fused matmul would round differently)
            block_modulation = torch.stack(
                [_call_under_offload_hook(block, block.modulation, pooled) for block in self.transformer_blocks]
            )
        return HARTPromptCondition(
            tokens=condition_BLD,
            pooled=pooled,
            block_modulation=block_modulation,
            output_modulation=self.norm_out.modulation(condition_BLD),
            position_offset=encoder_position_ids[:, -1],
            text_rotary=rotary_1d(encoder_position_ids, self.head_dim, self.config.rope_theta),
        )

    def _forward_stage(
        self,
        latent_tokens: Optional[torch.Tensor],
        stage_index: int,
        kv_cache: Optional[HARTKVCache],
        condition: HARTPromptCondition,
        return_dict: bool,
    ):
        """One scale of inference with the KV cache; see `forward`."""
        if kv_cache is None:
            raise ValueError("stage-by-stage inference (stage_index set) needs a kv_cache")
        start, end = self.stage_starts[stage_index], self.stage_starts[stage_index + 1]

        # 1. input tokens and their rotary tables
        # one level per stage: embed it once and broadcast, not once per token (4096 at the last stage)
        level_embedding = self.level_embed(self.level_ids[start : start + 1], condition.tokens.dtype)
        if stage_index == 0:
            tokens = condition.tokens + level_embedding
            rotary_emb = condition.text_rotary
        else:
            tokens = self.latent_embed(latent_tokens) + level_embedding
            ctx = self.config.context_length
            rotary_emb = self._image_rotary(slice(start - ctx, end - ctx), condition.position_offset)

        # 2. blocks, each with its modulation from the condition
        store_kv = stage_index < self.num_stages - 1  # no later stage reads the last one's keys and values
        hidden_states = tokens
        for layer_index, block in enumerate(self.transformer_blocks):
            modulation = None if condition.block_modulation is None else condition.block_modulation[layer_index]
            hidden_states = block(
                hidden_states, condition.pooled, rotary_emb, kv_cache, layer_index, None, store_kv, modulation
            )
        if store_kv:
            kv_cache.advance(hidden_states.shape[1])

        # 3. head
        # logits leave in float32: CFG mixing and sampling of a low-precision model stay accurate
        logits = self.proj_out(self.norm_out(hidden_states, modulation=condition.output_modulation)).float()
        if not return_dict:
            return logits, hidden_states, kv_cache
        return HARTTransformerOutput(logits=logits, hidden_states=hidden_states, kv_cache=kv_cache)

    def forward(
        self,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        encoder_position_ids: Optional[torch.Tensor] = None,
        latent_tokens: Optional[torch.Tensor] = None,
        stage_index: Optional[int] = None,
        kv_cache: Optional[HARTKVCache] = None,
        last_scale_keep: Optional[torch.Tensor] = None,
        return_dict: bool = True,
        condition: Optional[HARTPromptCondition] = None,
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
            last_scale_keep (`torch.Tensor`, *optional*): Training only: the last-scale tokens to keep, the others are
                dropped from the sequence. Either their positions, a `(B, K)` integer tensor ascending in every row, or
                a `(B, pn_last**2)` boolean mask with the same number K of True entries in every row. Positions cost no
                host sync; a mask has to read K on the host.
            condition (`HARTPromptCondition`, *optional*): With `stage_index`: the text inputs prepared once per
                generation by `prepare_condition`; the three `encoder_*` arguments are then not needed. Without it
                every stage prepares them again.
        """
        if stage_index is not None:
            if condition is None:
                condition = self._prepare_condition(encoder_hidden_states, encoder_attention_mask, encoder_position_ids)
            return self._forward_stage(latent_tokens, stage_index, kv_cache, condition, return_dict)
        if condition is not None:
            raise ValueError("`condition` serves stage-by-stage inference (with `stage_index`); training prepares its own")

        # training: the whole pyramid at once, block-causal, nothing cached
        B = encoder_hidden_states.shape[0]
        condition_BLD = self.embed_context(encoder_hidden_states)
        offset_B = encoder_position_ids[:, -1]

        # 1. input tokens and their rotary tables
        tokens = torch.cat((condition_BLD, self.latent_embed(latent_tokens)), dim=1)
        kept_positions = None
        if last_scale_keep is not None:
            kept_positions = last_scale_keep
            if kept_positions.dtype == torch.bool:
                kept_positions = kept_positions.nonzero()[:, 1].view(B, -1)
            tokens = _keep_last_scale(tokens, kept_positions, self.config.patch_nums[-1] ** 2)
        num_tokens = tokens.shape[1]
        tokens = tokens + self.level_embed(self.level_ids[:num_tokens], tokens.dtype)
        cos_c, sin_c = rotary_1d(encoder_position_ids, self.head_dim, self.config.rope_theta)
        cos_i, sin_i = self._image_rotary(slice(None), offset_B, kept_positions)
        rotary_emb = (torch.cat((cos_c, cos_i), dim=1), torch.cat((sin_c, sin_i), dim=1))
        attention_mask = self._block_causal_mask(num_tokens, tokens.device, tokens.dtype)

        # 2. blocks
        pooling = "avg" if self.config.block_conditioning == "adaln_single" else self.config.adaln_pooling
        pooled = pool_condition(condition_BLD, encoder_attention_mask, pooling)
        hidden_states = tokens
        for layer_index, block in enumerate(self.transformer_blocks):
            args = (hidden_states, pooled, rotary_emb, None, layer_index, attention_mask, False)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, *args)
            else:
                hidden_states = block(*args)

        # 3. head
        # logits leave in float32: the token loss and the training sampler read them
        logits = self.proj_out(self.norm_out(hidden_states, condition_BLD)).float()
        if not return_dict:
            return logits, hidden_states, None
        return HARTTransformerOutput(logits=logits, hidden_states=hidden_states)
