"""HARTTransformerTrainingModule: the transformer's training step as one module's forward.

A tiny model with patch_nums (1, 2, 4, 8): the last scale has 64 tokens, more than the 32 the step always keeps, and a
VAE with ch_mult (1, 1, 1) (downsampling 4) turns 32 px images into the 8 x 8 latent of that scale.
"""

import copy
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from diffusers_hart import HARTAutoEncoder, HARTResidualDiffusionScheduler, HARTTransformer2DModel
from diffusers_hart.pipelines.hart.tiny import tiny_random_pipeline
from diffusers_hart.training import (
    HARTTextEncoderTrainingModule,
    HARTTransformerTrainingModule,
    TrainingRandomness,
    sample_cond_drop,
    sample_mask_ratio,
    transformer_step,
)

PATCH_NUMS = (1, 2, 4, 8)
PROMPTS = ["a red square", "", "two blue dots", "a cat"]


def tiny_training_module(seed: int = 0, **kwargs) -> HARTTransformerTrainingModule:
    """A random tiny module; every transformer parameter is perturbed, so none starts at exactly 0 or 1 (the diffusion
    head's zero-initialised gates would otherwise leave the layers behind them without gradient)."""
    torch.manual_seed(seed)
    vae = HARTAutoEncoder(
        ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=4, vocab_size=32, patch_nums=PATCH_NUMS
    )
    transformer = HARTTransformer2DModel(
        patch_nums=PATCH_NUMS, num_layers=2, hidden_size=32, num_attention_heads=2, context_dim=32, context_length=16,
        vocab_size=32, latent_channels=4, diffusion_head_width=32, diffusion_head_depth=2,
    )  # fmt: skip
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return HARTTransformerTrainingModule(transformer, vae, HARTResidualDiffusionScheduler(), **kwargs).train()


@functools.lru_cache(maxsize=1)
def _cached_batch():
    pipe = tiny_random_pipeline(context_length=16)
    with torch.no_grad():
        prompt_embeds, prompt_attention_mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    pixels = torch.rand(len(PROMPTS), 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return pixels, prompt_embeds, prompt_attention_mask


def tiny_batch():
    """(pixel_values, prompt_embeds, prompt_attention_mask) of four images, the prompts encoded by the tiny pipeline
    (padded, one of them empty), as a trainer gets them."""
    return tuple(t.clone() for t in _cached_batch())


def tiny_text_encoder_training_module(seed: int = 0) -> HARTTextEncoderTrainingModule:
    """`tiny_training_module` with the tiny pipeline's text encoder trained along."""
    text_encoder = tiny_random_pipeline(context_length=16).text_encoder.requires_grad_(True).train()
    return HARTTextEncoderTrainingModule(tiny_training_module(seed), text_encoder)


def tiny_text_batch():
    """(pixel_values, *text_encoder_inputs) of `tiny_batch`'s images and prompts, for a trained text encoder."""
    pipe = tiny_random_pipeline(context_length=16)
    return (tiny_batch()[0], *pipe.text_encoder_inputs(PROMPTS, max_length=16))


def per_sample_generators(seeds):
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def test_loss_is_finite_and_decreases():
    module = tiny_training_module()
    batch = tiny_batch()
    assert batch[2].any(dim=1).tolist() == [True, False, True, True] and not batch[2].all()  # padded, one empty
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        out = module(*batch, generator=generator)
        assert all(torch.isfinite(v) for v in out.values())
        assert out.loss.ndim == 0 and not out.token_accuracy.requires_grad and 0 <= out.token_accuracy <= 1
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    # fresh draws every step, so the loss is noisy: compare the first and last few steps
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3]), losses


def test_loss_is_the_weighted_sum_and_label_smoothing_applies():
    batch = tiny_batch()
    plain = tiny_training_module()(*batch, generator=torch.Generator().manual_seed(3))
    weighted = tiny_training_module(diffusion_loss_weight=0.25, label_smoothing=0.1)(
        *batch, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(plain.loss, plain.token_loss + plain.diffusion_loss)
    torch.testing.assert_close(weighted.loss, weighted.token_loss + 0.25 * weighted.diffusion_loss)
    assert torch.equal(weighted.diffusion_loss, plain.diffusion_loss)
    assert weighted.token_loss > plain.token_loss  # smoothing puts mass on wrong tokens


def test_same_generator_seed_gives_identical_losses():
    module = tiny_training_module()
    batch = tiny_batch()

    def losses(generator):
        out = module(*batch, generator=generator)
        return torch.stack(list(out.values())).detach()

    first = losses(torch.Generator().manual_seed(5))
    assert torch.equal(first, losses(torch.Generator().manual_seed(5)))
    assert not torch.equal(first, losses(torch.Generator().manual_seed(6)))
    # per-sample generators leave the per-batch mask ratio to torch's default CPU generator: pass it
    lists = [module(*batch, generator=per_sample_generators(range(4)), mask_ratio=0.8).loss for _ in range(2)]
    assert torch.equal(*lists)


def test_per_sample_generators_draw_the_same_split_or_whole():
    """With one generator per sample, two halves of a batch draw what the whole batch draws: the mean of their losses
    is the loss of the whole (every sample weighs the same in every mean), as data-parallel training needs."""
    module = tiny_training_module()
    pixels, embeds, mask = tiny_batch()
    seeds = [11, 12, 13, 14]
    with torch.no_grad():
        whole = module(pixels, embeds, mask, generator=per_sample_generators(seeds), mask_ratio=0.7)
        halves = [
            module(pixels[rows], embeds[rows], mask[rows], generator=per_sample_generators(seeds[rows]), mask_ratio=0.7)
            for rows in (slice(0, 2), slice(2, 4))
        ]
    for name in ("loss", "token_loss", "diffusion_loss", "token_accuracy"):
        torch.testing.assert_close((halves[0][name] + halves[1][name]) / 2, whole[name], rtol=1e-5, atol=1e-6)


def test_every_trainable_parameter_gets_a_gradient():
    module = tiny_training_module()
    module(*tiny_batch(), generator=torch.Generator().manual_seed(0)).loss.backward()
    transformer = module.transformer
    missing = [n for n, p in transformer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    assert len(list(transformer.diffusion_head.parameters())) > 0
    assert all(not p.requires_grad and p.grad is None for p in module.vae.parameters())
    # the frozen VAE stays in eval mode whatever the trainer's mode
    module.train()
    assert module.transformer.training and not any(m.training for m in module.vae.modules())


def test_a_trained_text_encoder_gets_gradients_and_its_context_is_the_pipelines():
    module = tiny_text_encoder_training_module()
    pixels, *text_inputs = tiny_text_batch()
    embeds, mask = tiny_batch()[1:]
    assert torch.equal(text_inputs[2], mask)
    generator = torch.Generator().manual_seed(0)
    # the context the module encodes is what the pipeline's encode_prompt gives: the same loss as a frozen encoder's
    frozen = tiny_training_module()(pixels, embeds, mask, generator=copy.deepcopy(generator), mask_ratio=0.7)
    out = module(pixels, *text_inputs, generator=generator, mask_ratio=0.7)
    torch.testing.assert_close(out.loss, frozen.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    missing = [n for n, p in module.text_encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_configuration_errors_name_the_fix():
    module = tiny_training_module()
    with pytest.raises(ValueError, match="patch_nums"):
        small = HARTTransformer2DModel(patch_nums=(1, 2, 4), num_layers=1, hidden_size=32, num_attention_heads=2,
                                       context_dim=32, context_length=16, vocab_size=32, latent_channels=4)  # fmt: skip
        HARTTransformerTrainingModule(small, module.vae, module.scheduler)
    with pytest.raises(ValueError, match="larger last patch_num"):
        small_vae = HARTAutoEncoder(
            ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=4, vocab_size=32, patch_nums=(1, 2, 4)
        )
        HARTTransformerTrainingModule(small, small_vae, module.scheduler)
    with pytest.raises(ValueError, match="one generator per sample"):
        module(*tiny_batch(), generator=per_sample_generators(range(3)))


class _HostSyncDetector(TorchDispatchMode):
    """Records every operator that makes the host wait for the device on an accelerator.

    On a CPU run nothing waits, so the ops are recognised instead: reading a value (`_local_scalar_dense`: `.item()`,
    `int()`, `bool()`, `if tensor`), data-dependent output sizes (`nonzero`, boolean-mask indexing, `masked_select`),
    and ops that check their input on the host (`multinomial`, `equal`). Host copies (`.cpu()`, `.tolist()`,
    `.numpy()`) are no ops on a CPU tensor, so they are caught where they are called instead.
    """

    _READS = frozenset(
        {
            torch.ops.aten._local_scalar_dense.default,
            torch.ops.aten.nonzero.default,
            torch.ops.aten.masked_select.default,
            torch.ops.aten.multinomial.default,
            torch.ops.aten.equal.default,
            torch.ops.aten.is_nonzero.default,
            torch.ops.aten._unique2.default,
            torch.ops.aten.repeat_interleave.Tensor,
        }
    )
    _INDEXING = frozenset(
        {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default}
    )

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func in self._INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        )
        if func in self._READS or boolean_index:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))




def _watch_host_copies(monkeypatch, copies):
    import sys

    for name in ("cpu", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def watched(self, *args, _original=original, _name=name, **kwargs):
            copies.append((_name, sys._getframe(1).f_globals.get("__name__")))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, watched)


def test_training_step_never_syncs_with_the_host(monkeypatch):
    """No device read in forward or backward, but the mask ratio's: a host draw from a CPU generator (it sets the
    sequence length), run here with the detector paused after checking where it draws from."""
    module = tiny_training_module()
    batch = tiny_batch()
    host_draws = []

    def host_draw(generator):
        assert generator is None or generator.device.type == "cpu"
        host_draws.append(generator)
        with _disable_current_modes():
            return sample_mask_ratio(generator)

    monkeypatch.setattr(transformer_step, "sample_mask_ratio", host_draw)
    for generator in (torch.Generator().manual_seed(0), per_sample_generators(range(4)), None):
        copies = []
        with monkeypatch.context() as patch:
            _watch_host_copies(patch, copies)
            with _HostSyncDetector() as detector:
                module(*batch, generator=generator).loss.backward()
        assert detector.syncs == []
        assert copies == []
    assert len(host_draws) == 3

    # the detector sees what the previous implementation did
    with _HostSyncDetector() as detector:
        keep = torch.zeros(4, 64, dtype=torch.bool)
        keep[:, :40] = True
        module.transformer(batch[1], batch[2], batch[2].long().cumsum(1) - 1,
                           latent_tokens=torch.randn(4, 84, 4), last_scale_keep=keep)  # fmt: skip
        int(keep.sum())
    assert detector.syncs == ["aten.nonzero.default", "aten._local_scalar_dense.default"]


def test_scheduler_training_loss_stays_on_the_device(monkeypatch):
    scheduler = HARTResidualDiffusionScheduler()
    x_start, noise, timesteps = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 1000, (6,))
    copies = []
    _watch_host_copies(monkeypatch, copies)
    scheduler.training_losses(torch.randn(6, 8), x_start, noise, timesteps)
    assert copies == []


def test_block_causal_mask_is_built_once_and_shared_by_every_length():
    module = tiny_training_module()
    transformer = module.transformer
    batch = tiny_batch()
    module(*batch, generator=torch.Generator().manual_seed(0))
    assert len(transformer._block_causal_masks) == 1
    (cached,) = transformer._block_causal_masks.values()
    module(*batch, generator=torch.Generator().manual_seed(1))
    (again,) = transformer._block_causal_masks.values()
    assert again is cached

    # shorter sequences (fewer kept tokens) get views of the same memory, with aligned rows
    level_ids = transformer.level_ids
    for num_tokens in (transformer.sequence_length, transformer.sequence_length - 20, 13):
        mask = transformer._block_causal_mask(num_tokens, level_ids.device, torch.float32)
        assert mask.data_ptr() == cached.data_ptr() and mask.stride(0) % 16 == 0
        visible = level_ids[:num_tokens, None] >= level_ids[None, :num_tokens]
        assert torch.equal(mask == 0, visible) and torch.isneginf(mask[~visible]).all()
    assert len(transformer._block_causal_masks) == 1
    transformer._block_causal_mask(13, level_ids.device, torch.float64)
    assert len(transformer._block_causal_masks) == 2


def test_lora_trains_only_the_adapter_and_round_trips(tmp_path):
    from peft import LoraConfig

    module = tiny_training_module()
    base = copy.deepcopy(module.transformer)
    transformer = module.transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_qkv", "to_out", "gate_proj", "up_proj", "down_proj"])
    )
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    batch = tiny_batch()
    for step in range(3):
        optimizer.zero_grad()
        module(*batch, generator=torch.Generator().manual_seed(step)).loss.backward()
        optimizer.step()
    for name, p in transformer.named_parameters():
        assert torch.equal(p, before[name]) != ("lora_" in name), f"{name}: changed only if it is an adapter weight"

    transformer.save_lora_adapter(str(tmp_path))
    base.load_lora_adapter(str(tmp_path), prefix=None, use_safetensors=True)
    inputs = dict(encoder_hidden_states=batch[1], encoder_attention_mask=batch[2],
                  encoder_position_ids=batch[2].long().cumsum(1) - 1, latent_tokens=torch.randn(4, 84, 4))  # fmt: skip
    with torch.no_grad():
        trained = transformer(**inputs).logits
        torch.testing.assert_close(base(**inputs).logits, trained, rtol=0, atol=0)
        base.disable_adapters()
        assert not torch.allclose(base(**inputs).logits, trained)


def test_cond_drop_rate_is_the_stated_one_unless_the_original_is_asked_for():
    """The original compares the rate with a normal draw (Phi(0.1) = 0.54 of the rows); the trainer's default is the
    stated rate. 20000 rows put 4 standard deviations at 0.009 (rate 0.1) and 0.014 (0.54)."""
    generator = torch.Generator().manual_seed(0)
    stated = sample_cond_drop(20000, 0.1, generator, original=False).float().mean().item()
    original = sample_cond_drop(20000, 0.1, generator).float().mean().item()
    assert abs(stated - 0.1) < 0.009
    assert abs(original - 0.5398) < 0.014


def test_training_module_draws_the_stated_cond_drop_rate(monkeypatch):
    rates = []
    real = transformer_step.sample_cond_drop
    monkeypatch.setattr(transformer_step, "sample_cond_drop", lambda *a: rates.append(a[-1]) or real(*a))
    module = tiny_training_module()
    module(*tiny_batch(), generator=torch.Generator().manual_seed(0))
    module.original_cond_drop = True
    module(*tiny_batch(), generator=torch.Generator().manual_seed(0))
    assert rates == [False, True]


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_the_steps_device_work_does_not_grow_with_the_batch():
    """One generator: the step runs the same ops for 2 images as for 4 (launches are host time; a randperm per row
    made the step's host cost grow with the batch and bounded training on a GPU), and the last-scale orders are
    permutations, different per row."""
    module = tiny_training_module()
    pixels, prompt_embeds, prompt_attention_mask = tiny_batch()
    counts = []
    for size in (4, 2, 4):  # the first step builds what later steps reuse (the attention mask)
        batch = pixels[:size], prompt_embeds[:size], prompt_attention_mask[:size]
        module.zero_grad(set_to_none=True)
        with _OpCounter() as counter:
            module(*batch, generator=torch.Generator().manual_seed(0), mask_ratio=0.6).loss.backward()
        counts.append(counter.ops)
    assert counts[1] == counts[2]

    orders = TrainingRandomness(torch.Generator().manual_seed(0), 256, "cpu").permutations(64)
    assert torch.equal(orders.sort(dim=1).values, torch.arange(64).expand(256, 64))
    assert len({tuple(row) for row in orders.tolist()}) == 256
