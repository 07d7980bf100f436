"""End-to-end parity with the original HART: conversion of the released layout, then generation.

Per-stage logits, sampled indices and f-hat are captured from a real `HARTPipeline.__call__`
(wrapping the functions it calls, which still run) and compared with the golden tensors,
so a mismatch points at the first stage that diverged.
"""

import pytest
import torch
from conftest import CASES

import diffusers_hart.pipelines.hart.pipeline_hart as pipeline_module
import diffusers_hart.pipelines.hart.sampling as sampling_module
from diffusers_hart.conversion import from_original
from diffusers_hart.pipelines.hart.pipeline_hart import tokenize_for_text_encoder
from diffusers_hart.pipelines.hart.sampling import RandomStreams


@pytest.fixture(scope="module", params=CASES)
def case_pipe(request, golden, tmp_path_factory):
    case = request.param
    root = golden.released_layout(case, tmp_path_factory.mktemp(case))
    pipe = from_original(root, golden.root / "text_encoder")
    pipe.set_progress_bar_config(disable=True)
    return case, pipe


def _generate_with_capture(pipe, meta, more_smooth, monkeypatch):
    captured = {"logits": [], "indices": [], "fhat": []}
    original_filter, original_multinomial = sampling_module.top_k_top_p_filter, RandomStreams.multinomial
    original_residual = pipeline_module.sample_residual_tokens

    def recording_filter(logits, top_k, top_p):
        captured["logits"].append(logits.clone())
        return original_filter(logits, top_k, top_p)

    def recording_multinomial(self, probs):
        idx = original_multinomial(self, probs)
        captured["indices"].append(idx)
        return idx

    def record_fhat(pipe, stage_index, patch_num, kwargs):
        captured["fhat"].append(kwargs["latents"].clone())
        return {}

    def recording_residual(head, scheduler, condition, **kwargs):
        captured["diff.z"], captured["diff.cfg"] = condition.clone(), kwargs["guidance_scale"]
        captured["diff.sample_full"] = original_residual(head, scheduler, condition, **kwargs)
        return captured["diff.sample_full"]

    monkeypatch.setattr(pipeline_module, "sample_residual_tokens", recording_residual)
    monkeypatch.setattr(sampling_module, "top_k_top_p_filter", recording_filter)
    monkeypatch.setattr(RandomStreams, "multinomial", recording_multinomial)
    image = pipe(
        meta["prompts"],
        guidance_scale=meta["cfg"],
        more_smooth=more_smooth,
        generator=torch.Generator().manual_seed(meta["seed"]),
        output_type="pt",
        callback_on_step_end=record_fhat,
    ).images
    return image, captured


def test_system_prompt_is_the_originals(case_pipe, golden):
    _, pipe = case_pipe
    assert pipe.config.system_prompt == golden.system_prompt


def test_text_encoding(case_pipe, golden):
    case, pipe = case_pipe
    meta, expected = golden.case(case), golden.tensors(case)
    prompt_ids = tokenize_for_text_encoder(pipe.tokenizer, meta["prompts"], meta["max_token_length"]).input_ids
    golden.assert_close("text.input_ids", prompt_ids, expected["text.input_ids"])
    with_system = tokenize_for_text_encoder(
        pipe.tokenizer, meta["prompts"], meta["max_token_length"], pipe.config.system_prompt
    ).input_ids
    system_ids = with_system[:1, : with_system.shape[1] - prompt_ids.shape[1]]
    golden.assert_close("text.system_prompt_ids", system_ids, expected["text.system_prompt_ids"])
    context, mask, _, _ = pipe.encode_prompt(meta["prompts"], device="cpu")
    position_ids = pipeline_module.text_position_ids(mask)
    golden.assert_close("text.context_mask", mask, expected["text.context_mask"])
    golden.assert_close("text.context_position_ids", position_ids, expected["text.context_position_ids"])
    golden.assert_close("text.context", context, expected["text.context"])


@pytest.mark.parametrize("more_smooth", [False, True])
def test_generation_matches_original(case_pipe, golden, more_smooth, monkeypatch):
    case, pipe = case_pipe
    meta, expected = golden.case(case), golden.tensors(case)
    prefix = f"gen.smooth{int(more_smooth)}"
    image, captured = _generate_with_capture(pipe, meta, more_smooth, monkeypatch)
    num_stages = len(pipe.transformer.config.patch_nums)
    assert len(captured["logits"]) == num_stages
    for si in range(num_stages):
        golden.assert_close(f"{prefix}.stage{si}.logits", captured["logits"][si], expected[f"{prefix}.stage{si}.logits"])
        golden.assert_close(f"{prefix}.stage{si}.indices", captured["indices"][si], expected[f"{prefix}.stage{si}.indices"])
        if si < num_stages - 1:
            golden.assert_close(f"{prefix}.stage{si}.fhat", captured["fhat"][si], expected[f"{prefix}.stage{si}.fhat"])
    golden.assert_close(f"{prefix}.diff.z", captured["diff.z"], expected[f"{prefix}.diff.z"])
    golden.assert_close(f"{prefix}.diff.cfg", torch.tensor([captured["diff.cfg"]]), expected[f"{prefix}.diff.cfg"])
    golden.assert_close(f"{prefix}.diff.sample_full", captured["diff.sample_full"], expected[f"{prefix}.diff.sample_full"])
    golden.assert_close(f"{prefix}.fhat", captured["fhat"][-1], expected[f"{prefix}.fhat"])
    golden.assert_close(f"{prefix}.image", image, expected[f"{prefix}.image"])
    # the case's single image tolerance must hold too
    assert (image - expected[f"{prefix}.image"]).abs().max() <= meta["image_atol"]
