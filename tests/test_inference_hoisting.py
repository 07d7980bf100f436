"""The prompt-only work of inference (context embedding, pooling, AdaLN modulations, text RoPE) runs once per
generation (`HARTTransformer2DModel.prepare_condition`), not once per scale, and changes no number."""

import pytest
import torch
from accelerate import cpu_offload

from diffusers_hart.models.transformers.transformer_hart import HARTTransformerBlock
from diffusers_hart.pipelines.hart.tiny import tiny_random_pipeline

CONDITIONINGS = ("adaln", "adaln_single", "prenorm")


def _tiny_transformer(conditioning):
    transformer = tiny_random_pipeline(block_conditioning=conditioning, patch_nums=(1, 2, 3, 4)).transformer
    with torch.no_grad():  # spread every modulation, so that a wrong or stale one shows in the logits
        for block in transformer.transformer_blocks:
            if conditioning == "adaln":
                block.adaln_linear.weight.normal_(std=0.3)
            elif conditioning == "adaln_single":
                block.scale_shift_table.normal_(std=0.3)
        transformer.norm_out.linear.weight.normal_(std=0.3)
    return transformer


def _text_inputs(batch_size=3, context_length=64, context_dim=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch_size, context_length, context_dim, generator=generator)
    lengths = torch.tensor([context_length // 2, 0, 5])[:batch_size]  # row 1: an empty prompt (position ids -1)
    mask = torch.arange(context_length)[None] < lengths[:, None]
    return hidden, mask, mask.long().cumsum(dim=1) - 1


def _stage_inputs(transformer, batch_size, seed=1):
    generator = torch.Generator().manual_seed(seed)
    channels = transformer.config.latent_channels
    return [None] + [
        torch.randn(batch_size, pn * pn, channels, generator=generator) for pn in transformer.config.patch_nums[1:]
    ]


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_stage_outputs_are_bit_identical_with_the_prepared_condition(conditioning):
    transformer = _tiny_transformer(conditioning)
    hidden, mask, position_ids = _text_inputs()
    condition = transformer.prepare_condition(hidden, mask, position_ids)
    per_stage_cache, prepared_cache = transformer.init_kv_cache(3), transformer.init_kv_cache(3)
    with torch.no_grad():
        for si, tokens in enumerate(_stage_inputs(transformer, 3)):
            per_stage = transformer(hidden, mask, position_ids, latent_tokens=tokens, stage_index=si, kv_cache=per_stage_cache)
            prepared = transformer(latent_tokens=tokens, stage_index=si, kv_cache=prepared_cache, condition=condition)
            assert torch.equal(per_stage.logits, prepared.logits), f"stage {si}"
            assert torch.equal(per_stage.hidden_states, prepared.hidden_states), f"stage {si}"


@pytest.mark.parametrize("field", ["tokens", "block_modulation", "output_modulation"])
def test_every_part_of_the_condition_is_read(field):
    # the bit-identity above would hold trivially if a stage recomputed a part instead of reading it
    transformer = _tiny_transformer("adaln")
    condition = transformer.prepare_condition(*_text_inputs())
    altered = condition.clone()
    with torch.no_grad():
        getattr(altered, field).mul_(1.5)
        own = transformer(stage_index=0, kv_cache=transformer.init_kv_cache(3), condition=condition)
        changed = transformer(stage_index=0, kv_cache=transformer.init_kv_cache(3), condition=altered)
    assert (own.logits - changed.logits).abs().max() > 1e-3


def test_prepared_condition_holds_every_prompt_only_input():
    transformer = _tiny_transformer("adaln")
    hidden, mask, position_ids = _text_inputs()
    condition = transformer.prepare_condition(hidden, mask, position_ids)
    num_layers, hidden_size = transformer.config.num_layers, transformer.config.hidden_size
    assert condition.batch_size == 3
    assert condition.tokens.shape == (3, transformer.config.context_length, hidden_size)
    assert condition.block_modulation.shape == (num_layers, 3, 6, hidden_size)
    assert condition.output_modulation.shape == (3, 2, hidden_size)
    assert torch.equal(condition.position_offset, position_ids[:, -1])
    assert condition.text_rotary[0].shape == (3, transformer.config.context_length, transformer.head_dim)
    block = transformer.transformer_blocks[1]
    assert torch.equal(condition.block_modulation[1], block.modulation(condition.pooled))
    assert _tiny_transformer("prenorm").prepare_condition(hidden, mask, position_ids).block_modulation is None


def test_copy_keeps_the_buffers_a_cuda_graph_reads():
    transformer = _tiny_transformer("adaln_single")
    static = transformer.prepare_condition(*_text_inputs()).clone()
    addresses = [t.data_ptr() for t in static._tensors()]
    fresh = transformer.prepare_condition(*_text_inputs(seed=7))
    static.copy_(fresh)
    assert [t.data_ptr() for t in static._tensors()] == addresses
    for mine, theirs in zip(static._tensors(), fresh._tensors()):
        assert torch.equal(mine, theirs)


def test_condition_is_refused_without_a_stage():
    transformer = _tiny_transformer("adaln")
    hidden, mask, position_ids = _text_inputs()
    condition = transformer.prepare_condition(hidden, mask, position_ids)
    with pytest.raises(ValueError, match="stage_index"):
        transformer(hidden, mask, position_ids, condition=condition)


def _count_calls(module, counts, name):
    return module.register_forward_hook(lambda *_: counts.__setitem__(name, counts.get(name, 0) + 1))


@pytest.mark.parametrize("max_batch_size", [None, 1])
def test_prompt_only_work_runs_once_per_generation(monkeypatch, max_batch_size):
    pipe = tiny_random_pipeline(patch_nums=(1, 2, 3, 4))
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    counts = {}
    handles = [_count_calls(block.adaln_linear, counts, "adaln_linear") for block in transformer.transformer_blocks]
    handles += [_count_calls(transformer.norm_out.linear, counts, "norm_out"), _count_calls(transformer.context_embed, counts, "context")]
    original = HARTTransformerBlock.modulation
    monkeypatch.setattr(
        HARTTransformerBlock, "modulation",
        lambda self, pooled: counts.__setitem__("modulation", counts.get("modulation", 0) + 1) or original(self, pooled),
    )  # fmt: skip
    pipe(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), output_type="latent", max_batch_size=max_batch_size)
    for handle in handles:
        handle.remove()
    generations = 1 if max_batch_size is None else 2  # one per micro-batch
    num_layers = transformer.config.num_layers
    assert counts == {
        "modulation": num_layers * generations,
        "adaln_linear": num_layers * generations,
        "norm_out": generations,
        "context": generations,
    }
    # without the prepared condition every stage did all of it again: the counters see that
    counts.clear()
    hidden, mask, position_ids = _text_inputs(batch_size=2, context_length=transformer.config.context_length)
    handles = [_count_calls(block.adaln_linear, counts, "adaln_linear") for block in transformer.transformer_blocks]
    kv_cache = transformer.init_kv_cache(2)
    with torch.no_grad():
        for si, tokens in enumerate(_stage_inputs(transformer, 2)):
            transformer(hidden, mask, position_ids, latent_tokens=tokens, stage_index=si, kv_cache=kv_cache)
    for handle in handles:
        handle.remove()
    assert counts["adaln_linear"] == num_layers * len(transformer.config.patch_nums)


def test_prepare_condition_under_sequential_offload():
    # the "adaln_single" table is a block's own parameter: offloading hooks keep it on the meta device outside the
    # block's forward, so preparing the condition has to run under the block's hook
    reference, offloaded = _tiny_transformer("adaln_single"), _tiny_transformer("adaln_single")
    offloaded.load_state_dict(reference.state_dict())
    cpu_offload(offloaded, torch.device("cpu"), offload_buffers=False)
    assert offloaded.transformer_blocks[0].scale_shift_table.device.type == "meta"
    inputs = _text_inputs()
    with torch.no_grad():
        expected, actual = reference.prepare_condition(*inputs), offloaded.prepare_condition(*inputs)
    for mine, theirs in zip(actual._tensors(), expected._tensors()):
        assert torch.equal(mine, theirs)
    assert offloaded.transformer_blocks[0].scale_shift_table.device.type == "meta", "the table was left on the device"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("max_batch_size", [None, 2])
def test_cuda_graphs_with_the_prepared_condition_and_micro_batches(max_batch_size):
    pipe = tiny_random_pipeline().to("cuda")
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a cat", "", "a dog", "a red car", "x"]

    def images():
        generators = [torch.Generator("cuda").manual_seed(s) for s in range(len(prompts))]
        return pipe(prompts, generator=generators, output_type="pt", more_smooth=False, max_batch_size=max_batch_size).images

    eager = images()
    pipe.enable_cuda_graphs()
    captured, replayed = images(), images()
    sizes = {rows for rows, _, _ in pipe._stage_runners}
    assert sizes == ({10} if max_batch_size is None else {4, 2})  # 5 images with 2 at most: 2 + 2 + 1, CFG doubled
    torch.testing.assert_close(captured, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(replayed, captured, atol=0, rtol=0)
    pipe.disable_cuda_graphs()
