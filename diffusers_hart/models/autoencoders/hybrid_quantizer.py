"""Hybrid multi-scale residual quantizer of the HART tokenizer.

A latent `f` (B, Cvae, H, W) is explained scale by scale: at stage `si` the still unexplained
residual is area-downsampled to `pn x pn`, snapped to its nearest codebook entries, and the
code map is bicubic-upsampled back to `H x W`, refined by a small conv `Phi` and subtracted.
What remains after the discrete last scale is the continuous residual that HART's diffusion
head models; discrete codes plus that residual give back `f` exactly.
"""

from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _resize(x_BChw: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if x_BChw.shape[-2:] == (size, size):
        return x_BChw
    return F.interpolate(x_BChw, size=(size, size), mode=mode)


class QuantResidualConv(nn.Conv2d):
    """`Phi(h) = (1 - ratio) * h + ratio * conv3x3(h)`: the refinement applied to an upsampled code map."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.ratio) + super().forward(h_BChw).mul(self.ratio)


class HARTHybridQuantizer(nn.Module):
    """Multi-scale residual vector quantizer with a continuous last-scale residual.

    Args:
        vocab_size (`int`): Number of codebook entries.
        z_channels (`int`): Latent channels `Cvae` (codebook entry size).
        patch_nums (`Sequence[int]`): Side length of the token map of every stage, small to large; the last one
            equals the latent side.
        quant_resi (`float`): Mixing ratio of the `Phi` refinement convs; `|quant_resi| <= 1e-6` disables them
            (identity, no parameters).
        share_quant_resi (`int`): How many `Phi` convs the stages share. `0`: one per stage (or
            `default_qresi_counts` of them), `1`: a single conv for every stage, `K >= 2`: `K` convs, stage `si`
            uses the one whose tick is nearest to `si / (SN - 1)`.
        default_qresi_counts (`int`): Number of convs when `share_quant_resi == 0`; `0` means one per stage.
        beta (`float`): Commitment weight of the training loss.
    """

    def __init__(
        self,
        vocab_size: int,
        z_channels: int,
        patch_nums: Sequence[int],
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        beta: float = 0.25,
    ):
        super().__init__()
        if len(patch_nums) < 2:
            raise ValueError(f"patch_nums needs at least two stages, got {tuple(patch_nums)}")
        if share_quant_resi < 0:
            raise ValueError(f"share_quant_resi must be >= 0, got {share_quant_resi}")
        self.vocab_size = vocab_size
        self.z_channels = z_channels
        self.patch_nums = tuple(int(pn) for pn in patch_nums)
        self.beta = beta

        if share_quant_resi == 0:
            num_convs = default_qresi_counts or len(self.patch_nums)
        else:
            num_convs = share_quant_resi
        self.quant_resi = nn.ModuleList(
            QuantResidualConv(z_channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()
            for _ in range(num_convs)
        )
        # The original puts K=4 ticks 1/(3K) from the ends and any other K 1/(2K) from them; numpy reproduces its
        # float64 ticks and first-minimum tie break, so every stage picks the same conv.
        margin = 1 / 3 / num_convs if num_convs == 4 else 1 / 2 / num_convs
        self._ticks = np.linspace(margin, 1 - margin, num_convs)
        self.embedding = nn.Embedding(vocab_size, z_channels)
        # The ids of all codes, for `codebook`: as a buffer they follow the module to its device, and they stay real
        # where offloading leaves the weights on the meta device until the embedding's own hook brings them.
        self.register_buffer("code_ids", torch.arange(vocab_size), persistent=False)

    def _refine(self, h_BChw: torch.Tensor, stage_index: int, num_stages: int) -> torch.Tensor:
        ratio = stage_index / (num_stages - 1)
        return self.quant_resi[int(np.argmin(np.abs(self._ticks - ratio)))](h_BChw)

    def codebook(self) -> torch.Tensor:
        """The (vocab_size, z_channels) code vectors, in the dtype the embedding computes in.

        They go through the embedding's forward instead of reading `embedding.weight`, so that hooks on it apply:
        under diffusers' layerwise casting the weight is stored in e.g. float8 and only its forward upcasts it.
        """
        return self.embedding(self.code_ids)

    def _nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        codebook_VC = self.codebook().detach()
        # Same expansion and op order as the original so that near-ties pick the same entry.
        dist_NV = z_NC.square().sum(dim=1, keepdim=True) + codebook_VC.square().sum(dim=1)
        return torch.addmm(dist_NV, z_NC, codebook_VC.T, alpha=-2).argmin(dim=1)

    def _code_map(self, indices_Bl: torch.Tensor, side: int) -> torch.Tensor:
        batch = indices_Bl.shape[0]
        return self.embedding(indices_Bl).transpose(1, 2).reshape(batch, self.z_channels, side, side)

    def _check_latent(self, latent_BChw: torch.Tensor, patch_nums: Sequence[int]) -> None:
        if latent_BChw.shape[-2:] != (patch_nums[-1], patch_nums[-1]):
            side = tuple(latent_BChw.shape[-2:])
            raise ValueError(f"latent of spatial size {side} does not match the last patch_num {patch_nums[-1]}")

    def _stage_contribution(
        self, tokens_BChw: torch.Tensor, stage_index: int, num_stages: int, side: int, refine: bool
    ) -> torch.Tensor:
        h_BChw = _resize(tokens_BChw, side, "bicubic")
        return self._refine(h_BChw, stage_index, num_stages) if refine else h_BChw

    def _accumulated_fhats(
        self, indices: Sequence[torch.LongTensor], patch_nums: Tuple[int, ...], refine_last_scale: bool
    ) -> Iterator[torch.Tensor]:
        """`f_hat` after each stage of `indices`.

        The sum starts from the first stage's map, not from zeros whose dtype would have to be read off the weights
        (their storage dtype under layerwise casting). That map is made contiguous, as a sum starting from zeros is:
        a code map comes out channels-last, every later sum would keep that layout, and the decoder's convolutions
        round differently on it.
        """
        num_stages, side = len(patch_nums), patch_nums[-1]
        f_hat = None
        for si, (indices_Bl, pn) in enumerate(zip(indices, patch_nums)):
            refine = refine_last_scale or si < num_stages - 1
            h_BChw = self._stage_contribution(self._code_map(indices_Bl, pn), si, num_stages, side, refine)
            f_hat = h_BChw.contiguous() if f_hat is None else f_hat + h_BChw
            yield f_hat

    @torch.no_grad()
    def latent_to_indices(
        self, latent_BChw: torch.Tensor, patch_nums: Optional[Sequence[int]] = None
    ) -> Tuple[List[torch.LongTensor], torch.Tensor]:
        """Tokenize a continuous latent.

        Args:
            latent_BChw (`torch.Tensor`): Continuous latent `f` of shape (B, Cvae, H, W), H = W = patch_nums[-1].
            patch_nums (`Sequence[int]`, *optional*): Stage sides; defaults to the quantizer's.

        Returns:
            `(indices, frest_last)`: `indices[si]` of shape (B, pn*pn) for every stage, and the residual left
            before the last discrete scale, (B, H*W, Cvae): the diffusion head's target is that residual minus
            the last scale's code vectors.
        """
        patch_nums = tuple(patch_nums or self.patch_nums)
        self._check_latent(latent_BChw, patch_nums)
        batch, channels, side, _ = latent_BChw.shape
        num_stages = len(patch_nums)
        f_rest = latent_BChw.detach()
        indices = []
        for si, pn in enumerate(patch_nums):
            z_NC = _resize(f_rest, pn, "area").permute(0, 2, 3, 1).reshape(-1, channels)
            indices.append(self._nearest_code(z_NC).view(batch, pn * pn))
            if si < num_stages - 1:
                tokens_BChw = self._code_map(indices[-1], pn)
                f_rest = f_rest - self._stage_contribution(tokens_BChw, si, num_stages, side, True)
        return indices, f_rest.permute(0, 2, 3, 1).reshape(batch, side * side, channels)

    def indices_to_fhat(
        self,
        indices: Sequence[torch.LongTensor],
        refine_last_scale: bool = False,
        patch_nums: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Sum the code maps of all stages into `f_hat` (B, Cvae, H, W).

        Args:
            indices (`Sequence[torch.LongTensor]`): One (B, pn*pn) index tensor per stage.
            refine_last_scale (`bool`, defaults to `False`): `False` accumulates like HART inference (the last
                scale is added as is); `True` also passes the last scale through `Phi`, as VAR's `idxBl_to_fhat`.
            patch_nums (`Sequence[int]`, *optional*): Stage sides; defaults to the quantizer's.
        """
        patch_nums = tuple(patch_nums or self.patch_nums)
        *_, f_hat = self._accumulated_fhats(indices, patch_nums, refine_last_scale)
        return f_hat

    def teacher_forcing_input(
        self, indices: Sequence[torch.LongTensor], patch_nums: Optional[Sequence[int]] = None
    ) -> torch.Tensor:
        """Transformer training input: for each stage 1..SN-1, `f_hat` of the earlier stages area-downsampled to it.

        Args:
            indices (`Sequence[torch.LongTensor]`): (B, pn*pn) indices of at least the first SN-1 stages; further
                entries (such as the last scale or `frest_last`) are ignored.
            patch_nums (`Sequence[int]`, *optional*): Stage sides; defaults to the quantizer's.

        Returns:
            `torch.Tensor` of shape (B, sum(pn*pn for pn in patch_nums[1:]), Cvae).
        """
        patch_nums = tuple(patch_nums or self.patch_nums)
        f_hats = self._accumulated_fhats(indices[: len(patch_nums) - 1], patch_nums, refine_last_scale=True)
        stage_inputs = [_resize(f_hat, next_pn, "area") for f_hat, next_pn in zip(f_hats, patch_nums[1:])]
        return torch.cat([x_BChw.flatten(2).transpose(1, 2) for x_BChw in stage_inputs], dim=1)

    def next_autoregressive_input(
        self,
        stage_index: int,
        f_hat_BChw: torch.Tensor,
        tokens_BChw: torch.Tensor,
        patch_nums: Optional[Sequence[int]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One inference step: add stage `stage_index`'s token map to `f_hat` and build the next stage's input.

        Not in place: `f_hat_BChw` is left untouched and a new tensor is returned.

        Args:
            stage_index (`int`): Stage `si` the tokens belong to.
            f_hat_BChw (`torch.Tensor`): Accumulated (B, Cvae, H, W) map of the previous stages.
            tokens_BChw (`torch.Tensor`): Token map of stage `si`, (B, Cvae, pn, pn): code vectors or any mix of
                them.
            patch_nums (`Sequence[int]`, *optional*): Stage sides; defaults to the quantizer's.

        Returns:
            `(f_hat, next_input)`: the updated (B, Cvae, H, W) map and its area-downsampling to the next stage's
            side; at the last stage (tokens added without `Phi`) `next_input` is `f_hat` itself.
        """
        patch_nums = tuple(patch_nums or self.patch_nums)
        num_stages = len(patch_nums)
        is_last = stage_index == num_stages - 1
        f_hat_BChw = f_hat_BChw + self._stage_contribution(
            tokens_BChw, stage_index, num_stages, patch_nums[-1], refine=not is_last
        )
        if is_last:
            return f_hat_BChw, f_hat_BChw
        return f_hat_BChw, _resize(f_hat_BChw, patch_nums[stage_index + 1], "area")

    def forward(
        self,
        latent_BChw: torch.Tensor,
        skip_continuous_prob: float = 0.0,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.LongTensor]]:
        """Training quantization with a straight-through estimator.

        Every stage (the last included) is refined by `Phi`. The continuous residual is then added back unless the
        call draws a skip: with probability `skip_continuous_prob` the output is the discrete reconstruction only.

        Args:
            latent_BChw (`torch.Tensor`): Continuous latent (B, Cvae, H, W).
            skip_continuous_prob (`float`, defaults to 0.0): Probability of dropping the continuous residual; 0 and 1
                are deterministic and draw nothing.
            generator (`torch.Generator`, *optional*): Source of the skip draw (one `torch.rand` per call).

        Returns:
            `(f_hat, vq_loss, indices)`: `f_hat` (B, Cvae, H, W) whose value is the quantized latent but whose
            gradient flows to `latent_BChw` unchanged, the scalar codebook + commitment loss, and the (B, pn*pn)
            indices of every stage.
        """
        patch_nums = self.patch_nums
        self._check_latent(latent_BChw, patch_nums)
        batch, channels, side, _ = latent_BChw.shape
        num_stages = len(patch_nums)
        f_no_grad = latent_BChw.detach()
        f_rest = f_no_grad
        f_hat = torch.zeros_like(f_no_grad)
        vq_loss = 0.0
        indices = []
        for si, pn in enumerate(patch_nums):
            z_NC = _resize(f_rest, pn, "area").permute(0, 2, 3, 1).reshape(-1, channels)
            indices.append(self._nearest_code(z_NC).view(batch, pn * pn))
            h_BChw = self._stage_contribution(self._code_map(indices[-1], pn), si, num_stages, side, True)
            f_hat = f_hat + h_BChw
            f_rest = f_rest - h_BChw.detach()
            commitment = F.mse_loss(f_hat.detach(), latent_BChw).mul(self.beta)
            vq_loss = vq_loss + (commitment + F.mse_loss(f_hat, f_no_grad))
        vq_loss = vq_loss * (1.0 / num_stages)

        if skip_continuous_prob <= 0:
            keep_continuous = True
        elif skip_continuous_prob >= 1:
            keep_continuous = False
        else:
            device = generator.device if generator is not None else "cpu"
            keep_continuous = torch.rand((), generator=generator, device=device).item() >= skip_continuous_prob
        if keep_continuous:
            f_hat = f_hat + f_rest
        f_hat = (f_hat.detach() - f_no_grad) + latent_BChw
        return f_hat, vq_loss, indices
