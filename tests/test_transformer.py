"""HARTTransformer2DModel: component parity with the original, KV-cache consistency, save/load."""

import pytest
import torch
from conftest import CASES

from diffusers_hart import HARTTransformer2DModel
from diffusers_hart.conversion.convert_hart_to_diffusers import convert_transformer_folder
from diffusers_hart.conversion.tokenizer_checkpoint import load_tokenizer_folder


@pytest.fixture(scope="module")
def vae(golden):
    return load_tokenizer_folder(golden.root / "tokenizer")


def _cfg_inputs(expected):
    """The original's CFG-doubled text inputs: conditional rows, then zero context / zero positions / first-token mask."""
    context = expected["text.context"]
    mask = expected["text.context_mask"]
    uncond_mask = torch.zeros_like(mask)
    uncond_mask[:, 0] = True
    positions = expected["text.context_position_ids"]
    return (
        torch.cat([context, torch.zeros_like(context)]),
        torch.cat([mask, uncond_mask]),
        torch.cat([positions, torch.zeros_like(positions)]),
    )


@pytest.mark.parametrize("case", CASES)
def test_context_embedding_and_stage0_blocks(golden, vae, case):
    expected = golden.tensors(case)
    model, _ = convert_transformer_folder(golden.root / case / "llm", vae, use_ema=True)
    context, mask, positions = _cfg_inputs(expected)
    golden.assert_close("gen.cond_BD", model.embed_context(context), expected["gen.cond_BD"])

    block_outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: block_outputs.append(o)) for b in model.transformer_blocks]
    with torch.no_grad():
        model(context, mask, positions, stage_index=0, kv_cache=model.init_kv_cache(context.shape[0]))
    for hook in hooks:
        hook.remove()
    for i, out in enumerate(block_outputs):
        golden.assert_close(f"gen.stage0.block{i}.out", out, expected[f"gen.stage0.block{i}.out"])


def _tiny_model(block_conditioning):
    torch.manual_seed(0)
    model = HARTTransformer2DModel(
        patch_nums=(1, 2, 3, 5), num_layers=2, hidden_size=32, num_attention_heads=2, context_dim=24,
        context_length=6, vocab_size=40, latent_channels=4, block_conditioning=block_conditioning,
        diffusion_head_width=16, diffusion_head_depth=1,
    )  # fmt: skip
    with torch.no_grad():  # nonzero modulation so every conditioning path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _tiny_inputs(model, batch=2):
    g = torch.Generator().manual_seed(1)
    ctx_len = model.config.context_length
    context = torch.randn(batch, ctx_len, model.config.context_dim, generator=g)
    mask = torch.arange(ctx_len)[None] < torch.tensor([[4], [2]])[:batch]
    positions = mask.long().cumsum(1) - 1
    num_image_tokens = model.sequence_length - ctx_len
    tokens = torch.randn(batch, num_image_tokens, model.config.latent_channels, generator=g)
    return context, mask, positions, tokens


@pytest.mark.parametrize("block_conditioning", ["adaln", "adaln_single", "prenorm"])
def test_kv_cached_stages_equal_the_full_causal_forward(block_conditioning):
    model = _tiny_model(block_conditioning)
    context, mask, positions, tokens = _tiny_inputs(model)
    with torch.no_grad():
        full = model(context, mask, positions, latent_tokens=tokens)
        cache = model.init_kv_cache(context.shape[0])
        ctx = model.config.context_length
        staged = [model(context, mask, positions, stage_index=0, kv_cache=cache).logits]
        for si in range(1, model.num_stages):
            start, end = model.stage_starts[si] - ctx, model.stage_starts[si + 1] - ctx
            out = model(context, mask, positions, latent_tokens=tokens[:, start:end], stage_index=si, kv_cache=cache)
            staged.append(out.logits)
    # every stage but the last is stored: no later stage reads the last one's keys and values
    assert cache.length == cache.max_length == model.stage_starts[-2]
    torch.testing.assert_close(torch.cat(staged, dim=1), full.logits, atol=1e-5, rtol=1e-5)


def test_dropping_last_scale_tokens_keeps_the_kept_ones_identical():
    """A kept last-scale token sees all earlier scales and the other kept ones, so its logits change, but earlier
    scales cannot see the last scale at all, so their logits must not change."""
    model = _tiny_model("adaln")
    context, mask, positions, tokens = _tiny_inputs(model)
    last = model.config.patch_nums[-1] ** 2
    keep = torch.zeros(2, last, dtype=torch.bool)
    keep[:, ::2] = True
    with torch.no_grad():
        full = model(context, mask, positions, latent_tokens=tokens).logits
        dropped = model(context, mask, positions, latent_tokens=tokens, last_scale_keep=keep).logits
    assert dropped.shape[1] == full.shape[1] - last + int(keep[0].sum())
    torch.testing.assert_close(dropped[:, :-int(keep[0].sum())], full[:, :-last], atol=1e-6, rtol=1e-6)


def test_save_load_round_trip_and_config(tmp_path):
    model = _tiny_model("adaln_single")
    context, mask, positions, tokens = _tiny_inputs(model)
    model.save_pretrained(tmp_path)
    loaded = HARTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.block_conditioning == "adaln_single"
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(context, mask, positions, latent_tokens=tokens).logits,
            model(context, mask, positions, latent_tokens=tokens).logits,
            atol=0, rtol=0,
        )  # fmt: skip


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _tiny_model("adaln").train()
    context, mask, positions, tokens = _tiny_inputs(model)

    def grads():
        model.zero_grad()
        model(context, mask, positions, latent_tokens=tokens).logits.square().mean().backward()
        return [p.grad.clone() for p in model.transformer_blocks.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_conditioning="shared_adaln"), "block_conditioning"),
        (dict(adaln_pooling="min"), "adaln_pooling"),
        (dict(hidden_size=30, num_attention_heads=3), "divisible by 4"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HARTTransformer2DModel(**{**dict(num_layers=1, hidden_size=32, num_attention_heads=2), **kwargs})


def test_stage_inference_needs_a_cache():
    model = _tiny_model("prenorm")
    context, mask, positions, _ = _tiny_inputs(model)
    with pytest.raises(ValueError, match="kv_cache"):
        model(context, mask, positions, stage_index=0)
