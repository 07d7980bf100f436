"""The transformer with its fused ops (RMSNorm + modulate, RoPE, SwiGLU) against the same model on the torch
references: a teacher-forced training forward and its gradients, and an inference stage. On the GPU the kernels run
compiled; on a CPU in Triton's interpreter (the `kernels` fixture); skipped without triton.

Tolerance: float32 throughout. The ops differ from their references by at most 16 ulps (`tests/test_ops.py`, the
float32 summation orders of RMSNorm); three such normalisations per block over two blocks and the head, each
relative error passed on through O(1)-conditioned linear layers, stay below 1e-5 of the logits' scale, well above
float32 noise (1e-7) and well below what a wrong op would give (O(1)).
"""

import pytest
import torch

from diffusers_hart.ops import dispatch
from diffusers_hart.pipelines.hart.tiny import tiny_random_pipeline

RTOL_OF_SCALE = 1e-5


def _training_forward(transformer, device):
    generator = torch.Generator().manual_seed(0)
    B, cfg = 2, transformer.config
    tokens = sum(pn * pn for pn in cfg.patch_nums[1:])
    context = torch.randn(B, cfg.context_length, cfg.context_dim, generator=generator).to(device)
    mask = torch.ones(B, cfg.context_length, dtype=torch.bool, device=device)
    mask[1, 40:] = False
    position_ids = mask.long().cumsum(1) - 1
    latents = torch.randn(B, tokens, cfg.latent_channels, generator=generator).to(device)
    transformer.zero_grad()
    out = transformer(context, mask, position_ids, latent_tokens=latents)
    out.logits.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in transformer.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _assert_close_to_scale(fused, reference, what):
    scale = reference.abs().max().item()
    torch.testing.assert_close(fused, reference, atol=RTOL_OF_SCALE * scale, rtol=0, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("block_conditioning", ["adaln", "adaln_single", "prenorm"])
def test_training_forward_and_gradients_match_the_torch_path(kernels, monkeypatch, block_conditioning):
    transformer = tiny_random_pipeline(block_conditioning=block_conditioning).transformer.to(kernels).train()
    fused_logits, fused_grads = _training_forward(transformer, kernels)
    monkeypatch.setenv(dispatch.DISABLE_TRITON_ENV, "1")
    reference_logits, reference_grads = _training_forward(transformer, kernels)
    assert not torch.equal(fused_logits, reference_logits)  # the fused kernels did run (float32 sums differ)
    _assert_close_to_scale(fused_logits, reference_logits, "logits")
    assert fused_grads.keys() == reference_grads.keys()
    for name in reference_grads:
        _assert_close_to_scale(fused_grads[name], reference_grads[name], name)


def test_inference_stage_matches_the_torch_path(kernels, monkeypatch):
    pipe = tiny_random_pipeline().to(kernels)
    transformer, cfg = pipe.transformer, pipe.transformer.config
    prompt_embeds, mask, *_ = pipe.encode_prompt("a red circle at the top left", device=kernels)
    position_ids = mask.long().cumsum(1) - 1

    def stage_logits():
        condition = transformer.prepare_condition(prompt_embeds, mask, position_ids)
        cache = transformer.init_kv_cache(1)
        transformer(stage_index=0, kv_cache=cache, condition=condition)
        latents = torch.randn(1, cfg.patch_nums[1] ** 2, cfg.latent_channels, generator=torch.Generator().manual_seed(1))
        return transformer(latent_tokens=latents.to(kernels), stage_index=1, kv_cache=cache, condition=condition).logits

    with torch.no_grad():
        fused = stage_logits()
        monkeypatch.setenv(dispatch.DISABLE_TRITON_ENV, "1")
        reference = stage_logits()
    _assert_close_to_scale(fused, reference, "stage 1 logits")
