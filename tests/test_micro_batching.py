"""`HARTPipeline.__call__(max_batch_size=...)`: a batch runs in micro-batches through the transformer, the residual
head and the decoder, and each image keeps its tokens and noise."""

import weakref

import pytest
import torch

from diffusers_hart.pipelines.hart.pipeline_hart import _micro_batches
from diffusers_hart.pipelines.hart.sampling import RandomStreams
from diffusers_hart.pipelines.hart.tiny import tiny_random_pipeline

PROMPTS = ["a cat", "", "a dog", "a red car", "x"]
# Batched matmuls and convolutions round differently with the number of rows, so a micro-batched image is not
# bit-identical to the full batch's (measured: 5e-6 with hard tokens); see test_pipeline.py's BATCH_ATOL.
BATCH_ATOL = 1e-4


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generators(seeds=range(len(PROMPTS))):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize(
    "num_images, max_batch_size, sizes",
    [(5, None, [5]), (5, 5, [5]), (5, 8, [5]), (16, 8, [8, 8]), (10, 8, [5, 5]), (7, 3, [3, 2, 2]), (3, 1, [1, 1, 1])],
)
def test_micro_batches_are_even_and_in_order(num_images, max_batch_size, sizes):
    batches = _micro_batches(num_images, max_batch_size)
    assert [b.stop - b.start for b in batches] == sizes
    assert batches[0].start == 0 and batches[-1].stop == num_images
    assert all(a.stop == b.start for a, b in zip(batches, batches[1:]))


def _record_tokens(monkeypatch):
    """Every `multinomial` draw of a call, in call order."""
    draws, original = [], RandomStreams.multinomial

    def recording(self, probs):
        idx = original(self, probs)
        draws.append(idx)
        return idx

    monkeypatch.setattr(RandomStreams, "multinomial", recording)
    return draws


@pytest.mark.parametrize("max_batch_size", [1, 2, 4])
def test_per_image_generators_give_the_same_tokens_and_images(pipe, monkeypatch, max_batch_size):
    num_stages = len(pipe.transformer.config.patch_nums)
    draws = _record_tokens(monkeypatch)
    whole = pipe(PROMPTS, generator=_generators(), more_smooth=False, output_type="pt").images
    whole_tokens, draws[:] = list(draws), []
    split = pipe(PROMPTS, generator=_generators(), more_smooth=False, output_type="pt", max_batch_size=max_batch_size).images
    # draws come micro-batch by micro-batch, each a stage at a time: regroup them by stage
    num_batches = len(_micro_batches(len(PROMPTS), max_batch_size))
    assert len(draws) == num_stages * num_batches
    for si in range(num_stages):
        assert torch.equal(torch.cat(draws[si::num_stages]), whole_tokens[si]), f"stage {si}"
    torch.testing.assert_close(split, whole, atol=BATCH_ATOL, rtol=0)


def test_one_generator_micro_batches_draw_one_after_the_other(pipe):
    # The first micro-batch draws what a call on its images alone draws; later ones continue the same streams, so a
    # single generator's images depend on max_batch_size (documented), and are reproducible for a given one.
    def images(prompts, max_batch_size=None):
        generator = torch.Generator().manual_seed(3)
        return pipe(prompts, generator=generator, more_smooth=False, output_type="pt", max_batch_size=max_batch_size).images

    split = images(PROMPTS, max_batch_size=2)
    assert torch.equal(split[:2], images(PROMPTS[:2]))
    assert torch.equal(split, images(PROMPTS, max_batch_size=2))
    assert (split[2:] - images(PROMPTS)[2:]).abs().max() > 1e-3


def test_no_module_sees_more_rows_than_a_micro_batch(pipe):
    transformer_rows, decoder_rows, kv_rows = [], [], []
    handles = [
        pipe.transformer.register_forward_pre_hook(
            lambda m, args, kwargs: transformer_rows.append(kwargs["condition"].batch_size), with_kwargs=True
        ),
        pipe.vae.decoder.register_forward_pre_hook(lambda m, args: decoder_rows.append(args[0].shape[0])),
    ]
    init_kv_cache, caches, alive_at_creation = pipe.transformer.init_kv_cache, [], []

    def tracked_kv_cache(rows, **kwargs):
        alive_at_creation.append(sum(ref() is not None for ref in caches))
        kv_rows.append(rows)
        cache = init_kv_cache(rows, **kwargs)
        caches.append(weakref.ref(cache))
        return cache

    pipe.transformer.init_kv_cache = tracked_kv_cache
    try:
        images = pipe(PROMPTS, generator=_generators(), output_type="pt", max_batch_size=2).images
    finally:
        del pipe.transformer.init_kv_cache
        for handle in handles:
            handle.remove()
    assert images.shape[0] == len(PROMPTS)
    assert set(transformer_rows) == {4, 2}  # 2 + 2 + 1 images, doubled for guidance
    assert kv_rows == [4, 4, 2]  # one KV cache per micro-batch
    assert alive_at_creation == [0, 0, 0]  # each freed before the next is allocated: peak memory holds one
    assert decoder_rows == [2, 2, 1]


def test_without_guidance_and_with_latent_output(pipe):
    kwargs = dict(guidance_scale=0.0, more_smooth=False, output_type="latent")
    whole = pipe(PROMPTS, generator=_generators(), **kwargs).images
    split = pipe(PROMPTS, generator=_generators(), max_batch_size=3, **kwargs).images
    torch.testing.assert_close(split, whole, atol=BATCH_ATOL, rtol=0)


def test_callback_runs_for_every_micro_batch_and_stage(pipe):
    calls = []

    def callback(pipe, stage_index, patch_num, kwargs):
        calls.append((stage_index, kwargs["latents"].shape[0]))
        return {}

    pipe(PROMPTS, generator=_generators(), output_type="latent", max_batch_size=3, callback_on_step_end=callback)
    num_stages = len(pipe.transformer.config.patch_nums)
    assert calls == [(si, 3) for si in range(num_stages)] + [(si, 2) for si in range(num_stages)]


@pytest.mark.parametrize("value", [0, -2, 2.5, True, "4"])
def test_bad_max_batch_size_is_refused(pipe, value):
    with pytest.raises(ValueError, match="max_batch_size"):
        pipe("a cat", output_type="pt", max_batch_size=value)


def test_sequential_cpu_offload_with_micro_batches():
    from accelerate import cpu_offload

    reference, offloaded = tiny_random_pipeline(block_conditioning="adaln_single"), tiny_random_pipeline(
        block_conditioning="adaln_single"
    )
    for model in (offloaded.text_encoder, offloaded.transformer, offloaded.vae):
        cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)
    for p in (reference, offloaded):
        p.set_progress_bar_config(disable=True)
    kwargs = dict(more_smooth=False, output_type="pt", max_batch_size=1)
    torch.testing.assert_close(
        offloaded(PROMPTS[:3], generator=_generators(range(3)), **kwargs).images,
        reference(PROMPTS[:3], generator=_generators(range(3)), **kwargs).images,
        atol=0,
        rtol=0,
    )
