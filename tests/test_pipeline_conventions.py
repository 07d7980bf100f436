"""HARTPipeline held to diffusers' own pipeline conventions (the checks of diffusers' `PipelineTesterMixin`).

Call signature, callbacks, `encode_prompt` on its own, interruption, seeding, sampling filters, loading errors and
warnings, all on the tiny random-weight pipeline.
"""

import inspect
import logging

import pytest
import torch
from diffusers.callbacks import PipelineCallback
from diffusers.utils import logging as diffusers_logging

from diffusers_hart import HARTPipeline
from diffusers_hart.pipelines.hart.sampling import RandomStreams
from diffusers_hart.pipelines.hart.tiny import tiny_random_pipeline

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, seed=0, **kwargs):
    kwargs.setdefault("prompt", PROMPT)
    return pipe(generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images


# ---------------------------------------------------------------- signature and outputs
def test_call_signature_has_the_diffusers_parameters():
    parameters = inspect.signature(HARTPipeline.__call__).parameters
    expected = {
        "prompt", "negative_prompt", "height", "width", "guidance_scale", "num_images_per_prompt", "generator",
        "prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask",
        "num_inference_steps", "max_sequence_length", "output_type", "return_dict", "callback_on_step_end",
        "callback_on_step_end_tensor_inputs",
    }  # fmt: skip
    assert expected <= set(parameters)
    assert "latents" in HARTPipeline._callback_tensor_inputs and "prompt_embeds" in HARTPipeline._callback_tensor_inputs
    assert "Examples:" in HARTPipeline.__call__.__doc__ and "HARTPipeline.from_pretrained" in HARTPipeline.__call__.__doc__


def test_return_dict_false_gives_the_same_images(pipe):
    (images,) = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", return_dict=False)
    torch.testing.assert_close(images, _call(pipe), atol=0, rtol=0)


def test_generator_none_follows_torch_manual_seed(pipe):
    torch.manual_seed(11)
    first = pipe(PROMPT, output_type="pt").images
    torch.manual_seed(11)
    again = pipe(PROMPT, output_type="pt").images
    other = pipe(PROMPT, output_type="pt").images  # the global RNG moved on
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert (first - other).abs().max() > 1e-3


def test_system_prompt_can_be_left_out(pipe):
    with_system, _, _, _ = pipe.encode_prompt([PROMPT], device="cpu")
    without, _, _, _ = pipe.encode_prompt([PROMPT], device="cpu", use_system_prompt=False)
    assert (with_system - without).abs().max() > 1e-3  # the system prompt is context the text encoder attends to
    assert torch.isfinite(_call(pipe, use_system_prompt=False)).all()


# ---------------------------------------------------------------- callbacks and interruption
def test_callback_receives_the_requested_tensors(pipe):
    seen = []

    def callback(pipe, stage_index, patch_num, kwargs):
        seen.append(sorted(kwargs))
        return {}

    _call(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert seen == [["latents", "prompt_embeds"]] * len(pipe.transformer.config.patch_nums)


def test_callback_can_replace_the_prompt_embeds(pipe):
    def zero_prompt(pipe, stage_index, patch_num, kwargs):
        return {"prompt_embeds": torch.zeros_like(kwargs["prompt_embeds"])} if stage_index == 0 else {}

    changed = _call(pipe, callback_on_step_end=zero_prompt, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert (changed - _call(pipe)).abs().max() > 1e-4


def test_pipeline_callback_object(pipe):
    class ZeroLatentsAtEnd(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index != self.config.cutoff_step_index:
                return {}
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    latents = pipe(
        PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent",
        callback_on_step_end=ZeroLatentsAtEnd(cutoff_step_ratio=None, cutoff_step_index=len(pipe.transformer.config.patch_nums) - 1),
    ).images  # fmt: skip
    assert latents.abs().max() == 0


def test_interrupt_stops_after_the_current_scale(pipe):
    stages = []

    def stop(pipe, stage_index, patch_num, kwargs):
        stages.append(stage_index)
        pipe._interrupt = stage_index == 1
        return {}

    latents = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=stop).images
    assert stages == [0, 1] and torch.isfinite(latents).all()


# ---------------------------------------------------------------- encode_prompt on its own
def test_encode_prompt_works_with_only_the_text_components(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    text_only = HARTPipeline.from_pretrained(tmp_path, transformer=None, vae=None, scheduler=None)
    context_length = pipe.transformer.config.context_length
    isolated = text_only.encode_prompt([PROMPT, ""], "blurry", max_sequence_length=context_length, device="cpu")
    full = pipe.encode_prompt([PROMPT, ""], "blurry", device="cpu")
    for a, b in zip(isolated, full):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="max_sequence_length"):
        text_only.encode_prompt([PROMPT], device="cpu")


def test_encode_prompt_keeps_no_autograd_graph_of_the_text_encoder(pipe):
    # called by a user with grad mode on, the context must not hold the text encoder's activations alive
    assert torch.is_grad_enabled() and any(p.requires_grad for p in pipe.text_encoder.parameters())
    for tensor in pipe.encode_prompt([PROMPT], "blurry", device="cpu"):
        assert tensor.grad_fn is None and not tensor.requires_grad


def test_negative_embeds_with_several_images_per_prompt(pipe):
    embeds = pipe.encode_prompt([PROMPT, "a blue square"], ["blurry", "dark"], device="cpu")
    names = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    from_embeds = pipe(
        None, num_images_per_prompt=2, generator=generators, output_type="pt", more_smooth=False, **dict(zip(names, embeds))
    ).images
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    from_text = pipe(
        [PROMPT, "a blue square"], negative_prompt=["blurry", "dark"], num_images_per_prompt=2, generator=generators,
        output_type="pt", more_smooth=False,
    ).images  # fmt: skip
    torch.testing.assert_close(from_embeds, from_text, atol=0, rtol=0)


# ---------------------------------------------------------------- sampling
def test_top_k_and_top_p_are_respected(pipe, monkeypatch):
    """Every sampled index is inside the filter: among the k most likely, or inside the smallest top-p nucleus."""
    import diffusers_hart.pipelines.hart.sampling as sampling_module

    logits, draws = [], []
    original_filter, original_draw = sampling_module.top_k_top_p_filter, RandomStreams.multinomial
    monkeypatch.setattr(sampling_module, "top_k_top_p_filter", lambda x, k, p: logits.append(x) or original_filter(x, k, p))
    monkeypatch.setattr(RandomStreams, "multinomial", lambda self, probs: draws.append(original_draw(self, probs)) or draws[-1])
    top_k, top_p = 5, 0.6
    for kwargs in (dict(top_k=top_k, top_p=0.0), dict(top_k=0, top_p=top_p)):
        logits.clear(), draws.clear()
        _call(pipe, prompt=[PROMPT, ""], more_smooth=False, **kwargs)
        assert len(logits) == len(draws) == len(pipe.transformer.config.patch_nums)
        for stage_logits, idx in zip(logits, draws):
            # rank of each drawn token among its row's logits, most likely first
            rank = (stage_logits > stage_logits.gather(-1, idx.unsqueeze(-1))).sum(-1)
            if kwargs["top_k"]:
                assert (rank < top_k).all()
            else:  # the tokens ranked above the drawn one hold less than top_p of the mass
                probs = stage_logits.softmax(-1)
                mass_above = (probs * (stage_logits > stage_logits.gather(-1, idx.unsqueeze(-1)))).sum(-1)
                assert (mass_above < top_p).all()


def test_batch_independence_with_more_smooth_and_per_image_generators(pipe):
    batch = pipe([PROMPT, "a blue square"], generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="pt").images
    alone = pipe(["a blue square"], generator=[torch.Generator().manual_seed(2)], output_type="pt").images
    # gumbel-softmax at temperatures down to ~0.07 amplifies the float32 noise of batched vs single matmuls
    # (golden README: 1e-3 for more_smooth images); a wrong stream would differ by O(0.1)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-3, rtol=0)


def test_kv_cache_overflow_is_an_error():
    model = tiny_random_pipeline().transformer
    cache = model.init_kv_cache(1)
    keys = torch.zeros(1, model.config.num_attention_heads, model.sequence_length + 1, model.head_dim)
    with pytest.raises(ValueError, match="KV cache overflow"):
        cache.update(0, keys, keys)


# ---------------------------------------------------------------- bad input and messages
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(generator=5), "generator.*torch.Generator"),
        (dict(prompt=[PROMPT, None]), "item 1 is NoneType"),
        (dict(negative_prompt=[None]), "negative_prompt.*item 0"),
        (dict(prompt_embeds=torch.zeros(1, 2, 3), prompt=None), "prompt_embeds.*shape"),
    ],
)
def test_bad_input_messages_say_what_is_wrong(pipe, kwargs, message):
    call = dict(prompt=PROMPT, output_type="pt")
    call.update(kwargs)
    with pytest.raises(ValueError, match=message):
        pipe(**call)


def test_truncation_warning_quotes_at_most_200_characters(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        pipe.encode_prompt(["word " * 2000], device="cpu")
    quoted = caplog.text.split("tokens: ", 1)[1]
    assert len(quoted) < 220 and quoted.strip().endswith("...'")


def _diffusers_warnings(action):
    """Warnings that diffusers' loggers emit while `action()` runs."""
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    root = diffusers_logging.get_logger("diffusers")
    root.addHandler(handler)
    try:
        action()
    finally:
        root.removeHandler(handler)
    return [r.getMessage() for r in records]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casting_the_pipeline_prints_no_spurious_warnings(dtype):
    pipe = tiny_random_pipeline()
    assert _diffusers_warnings(lambda: pipe.to(dtype)) == []


def test_missing_local_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    for name in (str(missing), "./no-such-model", "~/no-such-model-hart"):
        with pytest.raises(FileNotFoundError, match=f"no such folder: {name}"):
            HARTPipeline.from_pretrained(name)


def test_hub_id_offline_says_it_is_not_cached(tmp_path):
    # the README's test command sets HF_HUB_OFFLINE=1; an empty cache_dir holds nothing
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache") as error:
        HARTPipeline.from_pretrained("someone/hart-not-cached", cache_dir=str(tmp_path))
    assert "\n" not in str(error.value)
