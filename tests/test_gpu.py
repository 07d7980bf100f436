"""HARTPipeline on a CUDA device: dtypes, generator devices, parity with the original, model CPU offload.

Skipped on machines without CUDA (CI has none); run on a GPU machine with the same command.
"""

import itertools

import pytest
import torch
from conftest import CASES

import diffusers_hart.pipelines.hart.sampling as sampling_module
from diffusers_hart.conversion import from_original
from diffusers_hart.models.transformers.kv_cache import HARTKVCache
from diffusers_hart.models.transformers.transformer_hart import HARTAttention
from diffusers_hart.pipelines.hart.sampling import RandomStreams
from diffusers_hart.pipelines.hart.tiny import tiny_random_pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """The golden data is float32 CPU math; TF32 would round products to 10 mantissa bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
def test_tiny_pipeline_on_gpu(dtype, generator_device):
    pipe = tiny_random_pipeline().to("cuda", dtype)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(generator_device).manual_seed(0)
    images = pipe(["a cat", ""], generator=generator, output_type="pt").images
    assert images.device.type == "cuda" and torch.isfinite(images).all()
    again = pipe(["a cat", ""], generator=torch.Generator(generator_device).manual_seed(0), output_type="pt").images
    torch.testing.assert_close(images, again, atol=0, rtol=0)


def _released_pipe(golden, case, tmp_path):
    root = golden.released_layout(case, tmp_path / case)
    pipe = from_original(root, golden.root / "text_encoder")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, meta, more_smooth=False):
    return pipe(
        meta["prompts"],
        guidance_scale=meta["cfg"],
        more_smooth=more_smooth,
        generator=torch.Generator().manual_seed(meta["seed"]),  # CPU generator: the original's streams
        output_type="pt",
    ).images


def _golden_draws(monkeypatch, expected, more_smooth):
    """Replace every random draw by the original's recorded one: token indices and residual noise.

    On CUDA the pipeline draws with CUDA's generator (a CPU generator only seeds it) through the fused sampler, so
    parity with the original's CPU draws is checked with those draws injected in its place.
    """
    prefix = f"gen.smooth{int(more_smooth)}"
    stages, noises = itertools.count(), itertools.count()
    num_steps = expected[f"{prefix}.diff.step_noise"].shape[0]

    def forced_tokens(logits, *args, gumbel_BlV=None, **kwargs):
        assert gumbel_BlV is None, "the golden draws are recorded with more_smooth off"
        return expected[f"{prefix}.stage{next(stages)}.indices"].to(logits.device), None

    def forced_noise(self, num_images, rows, channels, copies, dtype):
        i = next(noises)
        noise = expected[f"{prefix}.diff.noise_init"] if i == 0 else expected[f"{prefix}.diff.step_noise"][(i - 1) % num_steps]
        return noise.to(self.device, dtype)

    monkeypatch.setattr(sampling_module, "sample_tokens", forced_tokens)
    monkeypatch.setattr(RandomStreams, "randn", forced_noise)


@pytest.mark.parametrize("case", CASES)
def test_gpu_float32_reproduces_the_original_with_its_draws(golden, case, tmp_path, monkeypatch):
    pipe = _released_pipe(golden, case, tmp_path).to("cuda")
    meta, expected = golden.case(case), golden.tensors(case)
    _golden_draws(monkeypatch, expected, more_smooth=False)
    golden.assert_close("gen.smooth0.image", _generate(pipe, meta).cpu(), expected["gen.smooth0.image"])


def test_cpu_generator_draws_on_the_gpu(monkeypatch):
    pipe = tiny_random_pipeline().to("cuda")
    pipe.set_progress_bar_config(disable=True)
    draw_devices = []
    original = torch.rand

    def recording_rand(*args, generator=None, **kwargs):
        if generator is not None:
            draw_devices.append(generator.device.type)
        return original(*args, generator=generator, **kwargs)

    monkeypatch.setattr(torch, "rand", recording_rand)
    first = pipe("a cat", generator=torch.Generator().manual_seed(3), output_type="pt").images
    again = pipe("a cat", generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert draw_devices and set(draw_devices) == {"cuda"}
    torch.testing.assert_close(first, again, atol=0, rtol=0)


def test_model_cpu_offload_gives_the_same_images(golden, tmp_path):
    meta = golden.case(CASES[0])
    on_gpu = _generate(_released_pipe(golden, CASES[0], tmp_path / "a").to("cuda"), meta)
    offloaded = _released_pipe(golden, CASES[0], tmp_path / "b")
    offloaded.enable_model_cpu_offload()
    torch.testing.assert_close(_generate(offloaded, meta).cpu(), on_gpu.cpu(), atol=1e-6, rtol=0)
    assert offloaded.vae.device.type == "cpu"  # offloaded again after decoding


def test_sequential_cpu_offload_gives_the_same_images(golden, tmp_path):
    meta = golden.case(CASES[0])
    on_gpu = _generate(_released_pipe(golden, CASES[0], tmp_path / "a").to("cuda"), meta)
    offloaded = _released_pipe(golden, CASES[0], tmp_path / "b")
    offloaded.enable_sequential_cpu_offload()
    assert offloaded.transformer.proj_out.weight.device.type == "meta"
    torch.testing.assert_close(_generate(offloaded, meta).cpu(), on_gpu.cpu(), atol=1e-6, rtol=0)


def test_fp8_layerwise_casting_runs_on_gpu():
    pipe = tiny_random_pipeline().to("cuda", torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    for model in (pipe.transformer, pipe.vae):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    images = pipe(["a cat", ""], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.dtype == torch.bfloat16 and torch.isfinite(images).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_give_the_eager_images(dtype):
    pipe = tiny_random_pipeline().to("cuda", dtype)
    pipe.set_progress_bar_config(disable=True)
    calls = [("a cat", 0), (["a dog", ""], 1), ("a cat", 2)]

    def images(prompt, seed):
        return pipe(prompt, generator=torch.Generator("cuda").manual_seed(seed), output_type="pt", more_smooth=False).images

    eager = [images(*call) for call in calls]
    pipe.enable_cuda_graphs()
    graphed = [images(*call) for call in calls]  # the third replays the first batch size's graphs
    assert len(pipe._stage_runners) == 2
    for a, b in zip(graphed, eager):
        torch.testing.assert_close(a, b, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)
    torch.testing.assert_close(images(*calls[0]), graphed[0], atol=0, rtol=0)
    pipe.disable_cuda_graphs()
    torch.testing.assert_close(images(*calls[0]), eager[0], atol=0, rtol=0)


def test_cuda_graph_captures_share_one_warm_up_stream(monkeypatch):
    # cuBLAS keeps a workspace for every stream it ran on until the process ends: a stream per captured stage held
    # 0.9 GiB at the release's size (14 stages x 2 batch sizes)
    pipe = tiny_random_pipeline().to("cuda", torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_cuda_graphs()
    pipe("a cat", generator=torch.Generator("cuda").manual_seed(0), output_type="latent")  # torch.cuda.graph's own stream
    made, real_stream = [], torch.cuda.Stream

    def stream(*args, **kwargs):  # torch.cuda.current_stream() wraps an existing stream by its stream_id
        made.extend([] if "stream_id" in kwargs else [args])
        return real_stream(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "Stream", stream)
    pipe(["a cat", "a dog"], generator=torch.Generator("cuda").manual_seed(0), output_type="latent")  # a new runner
    assert len(pipe.transformer.config.patch_nums) > 2 and len(made) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_last_stage_attention_never_holds_the_score_matrix(dtype):
    # The release's last stage: 4,096 queries against the 5,654 cached tokens and themselves, 24 heads of 64, CFG's
    # two rows. Its (2, 24, 4096, 9750) scores would take 3.6 GiB in 16 bits; flash or memory-efficient attention
    # never materialises them, the math fallback does (at B=16, rows 16: 28.6 GiB).
    rows, heads, head_dim, queries, cached = 2, 24, 64, 4096, 5654
    attention = HARTAttention(heads * head_dim, heads).to("cuda", dtype)
    cache = HARTKVCache(1, rows, heads, head_dim, cached, device="cuda", dtype=dtype)
    cache.length = cached
    hidden_states = torch.randn(rows, queries, heads * head_dim, device="cuda", dtype=dtype)
    rotary = (torch.ones(rows, queries, head_dim, device="cuda"), torch.zeros(rows, queries, head_dim, device="cuda"))
    scores_bytes = rows * heads * queries * (cached + queries) * torch.finfo(dtype).bits // 8
    with torch.no_grad():
        attention(hidden_states, rotary, cache, 0, None, False)  # warm-up: workspaces, kernel selection
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        attention(hidden_states, rotary, cache, 0, None, False)
        torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < scores_bytes / 8
