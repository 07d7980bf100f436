"""HART tokenizer: a VQGAN-style conv autoencoder around the hybrid multi-scale quantizer.

Submodule and parameter names of the encoder / decoder follow the original release so that its weights map
one to one.
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput, EncoderOutput

# A saved pipeline names this module as the component's library, and diffusers finds how to load a component of a
# library outside diffusers by looking its base classes up by name in that module: `ModelMixin` must be bound here.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.utils.accelerate_utils import apply_forward_hook

from ..modeling_utils import HARTModelMixin
from ..normalization import Float32GroupNorm
from .hybrid_quantizer import HARTHybridQuantizer


def _tile_starts(size: int, tile: int, stride: int) -> List[int]:
    """Starts of the fewest tiles of side `tile` that cover `size` with steps of at most `stride`, spread evenly so
    that the last one ends at the edge: every tile is whole (a short tail tile would decode from little context)."""
    if size <= tile:
        return [0]
    count = -(-(size - tile) // stride) + 1
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _blend_ramp(length: int, ramp_in: int, ramp_out: int, device) -> torch.Tensor:
    """1-D blending weights of a tile: rising linearly over its first `ramp_in` samples, falling over its last
    `ramp_out`, 1 between. Over an overlap of o samples one tile's fall and the next one's rise sum to 1."""
    centers = torch.arange(length, dtype=torch.float32, device=device) + 0.5
    weights = torch.ones(length, dtype=torch.float32, device=device)
    if ramp_in:
        weights = torch.minimum(weights, centers / ramp_in)
    if ramp_out:
        weights = torch.minimum(weights, (length - centers) / ramp_out)
    return weights


def _group_norm(channels: int) -> nn.GroupNorm:
    return Float32GroupNorm(num_groups=32, num_channels=channels, eps=1e-6)


class HARTResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.dropout(self.norm2(h, silu=True)))
        return self.nin_shortcut(x) + h


class HARTAttentionBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width).transpose(-1, -2)
        q, k, v = qkv.unsqueeze(2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.proj_out(h.transpose(1, 2).reshape(batch, channels, height, width))


class HARTDownsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric right/bottom padding (as in taming-transformers) keeps the output at exactly H/2 x W/2.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class HARTUpsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _ResolutionStage(nn.Module):
    """Resnet blocks, each followed by attention on the lowest resolution."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, dropout: float, with_attention: bool):
        super().__init__()
        self.block = nn.ModuleList(
            HARTResnetBlock(in_channels if i == 0 else out_channels, out_channels, dropout) for i in range(num_blocks)
        )
        self.attn = nn.ModuleList(HARTAttentionBlock(out_channels) for _ in range(num_blocks if with_attention else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class _EncoderLevel(_ResolutionStage):
    def __init__(self, in_channels, out_channels, num_blocks, dropout, with_attention: bool, downsample: bool):
        super().__init__(in_channels, out_channels, num_blocks, dropout, with_attention)
        self.downsample = HARTDownsample(out_channels) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return x if self.downsample is None else self.downsample(x)


class _DecoderLevel(_ResolutionStage):
    def __init__(self, in_channels, out_channels, num_blocks, dropout, with_attention: bool, upsample: bool):
        super().__init__(in_channels, out_channels, num_blocks, dropout, with_attention)
        self.upsample = HARTUpsample(out_channels) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return x if self.upsample is None else self.upsample(x)


class _MidStage(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = HARTResnetBlock(channels, channels, dropout)
        self.attn_1 = HARTAttentionBlock(channels)
        self.block_2 = HARTResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _CheckpointedStages(nn.Module):
    """Base of the encoder and decoder: runs their resolution levels and mid stage through the checkpoint function
    that `ModelMixin.enable_gradient_checkpointing` sets, as diffusers' VAEs do; those hold nearly all activations."""

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False

    def _run_stage(self, stage: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(stage, h)
        return stage(h)


class HARTEncoder(_CheckpointedStages):
    def __init__(
        self, in_channels: int, z_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int, dropout: float
    ):
        super().__init__()
        num_levels = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            is_lowest = level == num_levels - 1
            self.down.append(_EncoderLevel(block_in, ch * mult, num_res_blocks, dropout, is_lowest, not is_lowest))
            block_in = ch * mult
        self.mid = _MidStage(block_in, dropout)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = self._run_stage(level, h)
        h = self._run_stage(self.mid, h)
        return self.conv_out(self.norm_out(h, silu=True))


class HARTDecoder(_CheckpointedStages):
    def __init__(
        self, out_channels: int, z_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int, dropout: float
    ):
        super().__init__()
        num_levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _MidStage(block_in, dropout)
        # `up[level]` works at the resolution of encoder level `level`; it is run from the last level to the first.
        levels = []
        for level in reversed(range(num_levels)):
            block_out = ch * ch_mult[level]
            levels.insert(
                0, _DecoderLevel(block_in, block_out, num_res_blocks + 1, dropout, level == num_levels - 1, level != 0)
            )
            block_in = block_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self._run_stage(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = self._run_stage(level, h)
        return self.conv_out(self.norm_out(h, silu=True))


class HARTAutoEncoder(HARTModelMixin, AutoencoderMixin, ConfigMixin):
    r"""
    The HART tokenizer: encoder, hybrid multi-scale quantizer and decoder.

    An image in [-1, 1] is encoded to a continuous latent `quant_conv(encoder(x))` of `z_channels` channels at
    1 / 2**(len(ch_mult) - 1) of its size. `quantize` turns that latent into per-scale codebook indices plus a
    continuous residual; `decode` maps a latent or an accumulated `f_hat` back to an image.

    Parameters:
        in_channels (`int`, defaults to 3): Channels of the input image.
        out_channels (`int`, defaults to 3): Channels of the decoded image.
        ch (`int`, defaults to 160): Base channel width of encoder and decoder.
        ch_mult (`Tuple[int, ...]`, defaults to `(1, 1, 2, 2, 4)`): Width multiplier of every resolution level; each
            level but the last halves (encoder) / doubles (decoder) the resolution.
        num_res_blocks (`int`, defaults to 2): Resnet blocks per encoder level (the decoder uses one more).
        dropout (`float`, defaults to 0.0): Dropout inside the resnet blocks.
        z_channels (`int`, defaults to 32): Latent channels (`Cvae`), also the codebook entry size.
        vocab_size (`int`, defaults to 4096): Codebook size.
        patch_nums (`Tuple[int, ...]`, defaults to `(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)`): Token-map side of every
            quantizer stage; the last equals the latent side.
        quant_conv_ks (`int`, defaults to 3): Kernel size of `quant_conv` and `post_quant_conv`.
        quant_resi (`float`, defaults to 0.5): Mixing ratio of the quantizer's `Phi` refinement convs (0 disables
            them).
        share_quant_resi (`int`, defaults to 4): Number of `Phi` convs shared across stages (0: one per stage, 1: one
            for all).
        default_qresi_counts (`int`, defaults to 0): Number of `Phi` convs when `share_quant_resi == 0` (0: one per
            stage).
        beta (`float`, defaults to 0.25): Commitment weight of the training VQ loss.

    Memory of `decode` (the largest activations of a generation: at 1024 px one image's first decoder level holds
    `ch` x 1024 x 1024 values, and the norms work in float32):
        * `enable_slicing()`: decode (and encode) one image of the batch at a time.
        * `enable_tiling()`: decode overlapping latent tiles one after the other and blend them linearly where they
          overlap (see `enable_tiling`). Encoding is never tiled.
        * `use_channels_last` (attribute, default `False`): on CUDA, decode in the channels-last memory format that
          cuDNN's fastest half-precision convolutions use (the decoder's conv weights are converted once); the
          returned images are contiguous as before, equal up to the convolutions' rounding. It changes nothing on
          other devices, and turning it off converts the weights back. Off by default: on an H200 (torch 2.11,
          bf16, 1024 px, B=1, `benchmarks/bench_decode.py`) the decode took 0.045 s contiguous and 0.078 s
          channels-last with the fused norm (`ops.group_norm_silu`, which reads a group's channels in short
          strided runs in that layout), 0.088 s and 0.136 s with torch's.

    Measured on an H200 (torch 2.11, bf16, 1024 px, the release's decoder, memory above the weights): a batch of 4
    peaked at 11.3 GiB (0.41 s); sliced, at 2.9 GiB (0.54 s); sliced and tiled in 512 px tiles, at 0.76 GiB.
    """

    _supports_gradient_checkpointing = True
    _channels_last_device_types = ("cuda",)  # where `use_channels_last` applies

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 160,
        ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        z_channels: int = 32,
        vocab_size: int = 4096,
        patch_nums: Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        quant_conv_ks: int = 3,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        beta: float = 0.25,
    ):
        super().__init__()
        self.encoder = HARTEncoder(in_channels, z_channels, ch, ch_mult, num_res_blocks, dropout)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=quant_conv_ks // 2)
        self.quantize = HARTHybridQuantizer(
            vocab_size,
            z_channels,
            patch_nums,
            quant_resi=quant_resi,
            share_quant_resi=share_quant_resi,
            default_qresi_counts=default_qresi_counts,
            beta=beta,
        )
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=quant_conv_ks // 2)
        self.decoder = HARTDecoder(out_channels, z_channels, ch, ch_mult, num_res_blocks, dropout)

        self.spatial_compression_ratio = 2 ** (len(ch_mult) - 1)
        # diffusers' switches (`AutoencoderMixin.enable_slicing`, `enable_tiling` below); decoding only, off by default
        self.use_slicing = False
        self.use_tiling = False
        # 576 px tiles every 448 px at most: a 1024 px image is 2 x 2 tiles of 36 latents overlapping by 128 px (1.27x
        # the pixels decoded); autoencoder_dc's 512 px tiles would take 3 x 3 (2.25x)
        self.tile_sample_min_height = 576
        self.tile_sample_min_width = 576
        self.tile_sample_stride_height = 448
        self.tile_sample_stride_width = 448
        self.use_channels_last = False
        self._decoder_is_channels_last = False

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def enable_tiling(
        self,
        tile_sample_min_height: Optional[int] = None,
        tile_sample_min_width: Optional[int] = None,
        tile_sample_stride_height: Optional[int] = None,
        tile_sample_stride_width: Optional[int] = None,
    ) -> None:
        r"""
        Decode latents larger than a tile as overlapping tiles, one after the other, blended linearly where they
        overlap. Peak memory follows the tile instead of the image.

        A tile sees only its own latents: the decoder's convolutions near a tile's border, its group norms'
        statistics and its attention at the lowest resolution differ from a whole-image decode there. Each output
        pixel is a convex combination of the tiles that cover it, so it is never further from the whole-image decode
        than the worst of those tiles; away from overlaps it is exactly one tile's decode.

        Args:
            tile_sample_min_height (`int`, *optional*), tile_sample_min_width (`int`, *optional*): Tile size in
                pixels (a multiple of `spatial_compression_ratio`); an image no larger is decoded whole.
            tile_sample_stride_height (`int`, *optional*), tile_sample_stride_width (`int`, *optional*): Largest step
                between tiles in pixels, smaller than the tile so that tiles overlap; the tiles are spread evenly so
                the last one ends at the edge, and overlap at least `tile - stride`.
        """
        given = lambda value, default: default if value is None else value  # noqa: E731
        height = given(tile_sample_min_height, self.tile_sample_min_height)
        width = given(tile_sample_min_width, self.tile_sample_min_width)
        stride_height = given(tile_sample_stride_height, self.tile_sample_stride_height)
        stride_width = given(tile_sample_stride_width, self.tile_sample_stride_width)
        factor = self.spatial_compression_ratio
        for name, tile, stride in (("height", height, stride_height), ("width", width, stride_width)):
            if tile % factor or stride % factor or not 0 < stride < tile:
                raise ValueError(
                    f"tile_sample_min_{name}={tile} and tile_sample_stride_{name}={stride} must be multiples of "
                    f"{factor} (the latent-to-pixel factor) with 0 < stride < tile, so that tiles overlap."
                )
        self.tile_sample_min_height, self.tile_sample_min_width = height, width
        self.tile_sample_stride_height, self.tile_sample_stride_width = stride_height, stride_width
        self.use_tiling = True

    def _decode_on_device(self, z: torch.Tensor) -> torch.Tensor:
        """`_decode` for inference: channels-last on CUDA (see the class docstring), contiguous images out."""
        channels_last = self.use_channels_last and z.device.type in self._channels_last_device_types
        # Converted once per switch, and only where the weights are real (not the meta placeholders of sequential
        # offload). Back to contiguous as well when the attribute is turned off: a convolution whose weight is
        # channels-last runs channels-last whatever its input, so leftover weights would keep the decode in that format.
        weight = self.decoder.conv_in.weight
        if channels_last != self._decoder_is_channels_last and weight.device.type == z.device.type:
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            self.post_quant_conv.to(memory_format=memory_format)
            self.decoder.to(memory_format=memory_format)
            self._decoder_is_channels_last = channels_last
        if not channels_last:
            return self._decode(z)
        return self._decode(z.contiguous(memory_format=torch.channels_last)).contiguous()

    def _decode_maybe_tiled(self, z: torch.Tensor) -> torch.Tensor:
        factor = self.spatial_compression_ratio
        tile_height, tile_width = self.tile_sample_min_height // factor, self.tile_sample_min_width // factor
        if self.use_tiling and (z.shape[-2] > tile_height or z.shape[-1] > tile_width):
            return self.tiled_decode(z, return_dict=False)[0]
        return self._decode_on_device(z)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True) -> Union[DecoderOutput, Tuple[torch.Tensor]]:
        """Decode `z` tile by tile (see `enable_tiling`); unclamped, as `_decode`."""
        factor = self.spatial_compression_ratio
        tile_h, tile_w = self.tile_sample_min_height // factor, self.tile_sample_min_width // factor
        rows = _tile_starts(z.shape[-2], tile_h, self.tile_sample_stride_height // factor)
        cols = _tile_starts(z.shape[-1], tile_w, self.tile_sample_stride_width // factor)
        tile_h, tile_w = min(tile_h, z.shape[-2]), min(tile_w, z.shape[-1])
        # overlap in pixels of each tile with the one before it and the one after it
        overlaps = lambda starts, tile: [(a + tile - b) * factor for a, b in zip(starts, starts[1:])]  # noqa: E731
        row_overlaps, col_overlaps = overlaps(rows, tile_h), overlaps(cols, tile_w)
        # float32 sums of weighted tiles and of weights: three image channels, small beside one tile's activations
        out = None
        weight_sum = torch.zeros(z.shape[-2] * factor, z.shape[-1] * factor, dtype=torch.float32, device=z.device)
        for i, r in enumerate(rows):
            ramp_h = _blend_ramp(tile_h * factor, ([0] + row_overlaps)[i], (row_overlaps + [0])[i], z.device)
            for j, c in enumerate(cols):
                ramp_w = _blend_ramp(tile_w * factor, ([0] + col_overlaps)[j], (col_overlaps + [0])[j], z.device)
                tile = self._decode_on_device(z[:, :, r : r + tile_h, c : c + tile_w])
                if out is None:
                    out = torch.zeros(*tile.shape[:2], *weight_sum.shape, dtype=torch.float32, device=z.device)
                weights = ramp_h[:, None] * ramp_w[None, :]
                region = (slice(r * factor, (r + tile_h) * factor), slice(c * factor, (c + tile_w) * factor))
                out[:, :, region[0], region[1]] += tile.float() * weights
                weight_sum[region] += weights
        decoded = (out / weight_sum).to(z.dtype)
        if not return_dict:
            return (decoded,)
        return DecoderOutput(sample=decoded)

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Union[EncoderOutput, Tuple[torch.Tensor]]:
        """Encode images (B, in_channels, H, W) in [-1, 1] to the continuous latent `f` (B, z_channels, h, w).

        Tokenize `f` with `latent_to_indices`.
        """
        if self.use_slicing and x.shape[0] > 1:
            latent = torch.cat([self._encode(image) for image in x.split(1)])
        else:
            latent = self._encode(x)
        if not return_dict:
            return (latent,)
        return EncoderOutput(latent=latent)

    def latent_to_indices(self, latent: torch.Tensor) -> Tuple[List[torch.LongTensor], torch.Tensor]:
        """Per-scale token indices of a continuous latent and the residual left before the last scale.

        See [`HARTHybridQuantizer.latent_to_indices`].
        """
        return self.quantize.latent_to_indices(latent)

    def indices_to_fhat(self, indices: Sequence[torch.LongTensor], refine_last_scale: bool = False) -> torch.Tensor:
        """The discrete latent `f_hat` of per-scale indices, ready for `decode`. See [`HARTHybridQuantizer.indices_to_fhat`]."""
        return self.quantize.indices_to_fhat(indices, refine_last_scale=refine_last_scale)

    def teacher_forcing_input(self, indices: Sequence[torch.LongTensor]) -> torch.Tensor:
        """The transformer's training input for per-scale indices. See [`HARTHybridQuantizer.teacher_forcing_input`]."""
        return self.quantize.teacher_forcing_input(indices)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True) -> Union[DecoderOutput, Tuple[torch.Tensor]]:
        """Decode a latent or an accumulated `f_hat` (B, z_channels, h, w) to images clamped to [-1, 1].

        With `enable_slicing()` one image at a time, with `enable_tiling()` tile by tile (see the class docstring).
        """
        if self.use_slicing and z.shape[0] > 1:
            sample = torch.cat([self._decode_maybe_tiled(latent) for latent in z.split(1)])
        else:
            sample = self._decode_maybe_tiled(z)
        sample = sample.clamp(-1, 1)
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    def forward(
        self,
        sample: torch.Tensor,
        skip_continuous_prob: float = 0.0,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> Union[DecoderOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """Training reconstruction through the quantizer.

        Args:
            sample (`torch.Tensor`): Images (B, in_channels, H, W) in [-1, 1].
            skip_continuous_prob (`float`, defaults to 0.0): Probability of decoding the discrete tokens only (see
                [`HARTHybridQuantizer.forward`]).
            generator (`torch.Generator`, *optional*): Source of the skip draw.
            return_dict (`bool`, defaults to `True`): Return a `DecoderOutput` instead of a tuple.

        Returns:
            `DecoderOutput` with the unclamped reconstruction `sample` and the VQ loss as `commit_loss`, or the
            tuple `(sample, vq_loss)`.
        """
        f_hat, vq_loss, _ = self.quantize(self._encode(sample), skip_continuous_prob, generator)
        reconstruction = self._decode(f_hat)
        if not return_dict:
            return reconstruction, vq_loss
        return DecoderOutput(sample=reconstruction, commit_loss=vq_loss)
