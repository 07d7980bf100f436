"""Half precision against float32 on the golden cases, with the sampled tokens teacher-forced.

A flipped multinomial draw would make any comparison meaningless, so every stage's draw is replaced by the
original's recorded indices (hard tokens, `more_smooth=False`): the float32 and the half-precision run then
see the same tokens and differ only by rounding.

Bounds, for a dtype of unit roundoff u (bfloat16 2**-8, float16 2**-11):

* Post-CFG logits of stage si: `LOGIT_ROUNDINGS * u * (1 + 2 t_si) * S_si`, where S_si is the largest |raw logit| of
  that stage in float32 and t_si the stage's guidance weight. The raw logits of both CFG halves carry a relative error
  of a number of u: the 3 blocks x 2 sublayers each round about three times at full size (norm output, projection,
  residual add), 18 roundings that add up in the worst case, fewer when they cancel: `LOGIT_ROUNDINGS = 16`.
  `(1 + t) cond - t uncond` then scales an error e to at most (1 + 2t) e.
* Images in [0, 1]: `IMAGE_ROUNDINGS * u`, with the residual head's sample injected too. The head's first step divides
  by sqrt(alpha_bar) of t = 999 and clips x0 to [-1, 1]: a rounding of epsilon can flip a clipped entry from -1 to 1,
  so its samples have no rounding bound (they differ by up to the residual's own size in half precision). With tokens
  and residual forced, the image differs through the f-hat accumulation and the decoder, whose 42 convolutions
  (golden tokenizer) each round their output once and whose group norms carry every error along with the signal
  (about 2x): `IMAGE_ROUNDINGS = 128`.

Measured (README "Precision"): logit errors up to 6 u S (1 + 2t) here (7.6 at the release's size on an H200).
"""

import copy
import itertools

import pytest
import torch
from conftest import CASES

import diffusers_hart.pipelines.hart.pipeline_hart as pipeline_module
import diffusers_hart.pipelines.hart.sampling as sampling_module
from diffusers_hart.conversion import from_original
from diffusers_hart.pipelines.hart.sampling import RandomStreams, guidance_ratios

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
LOGIT_ROUNDINGS = 16
IMAGE_ROUNDINGS = 128


def _cpu_supports(dtype):
    try:
        torch.nn.functional.conv2d(torch.ones(1, 2, 4, 4, dtype=dtype), torch.ones(2, 2, 3, 3, dtype=dtype))
        return True
    except RuntimeError:
        return False


def _teacher_forced_run(pipe, meta, expected, monkeypatch, residual=None):
    """Post-CFG logits, raw logits per stage, the residual head's sample and the image.

    The original's indices are injected at every stage, and `residual` (when given) replaces the head's sample.
    """
    stages = itertools.count()
    post_cfg, raw, sampled = [], [], []
    original_filter, original_head = sampling_module.top_k_top_p_filter, pipeline_module.sample_residual_tokens

    def head(*args, **kwargs):
        sampled.append(original_head(*args, **kwargs) if residual is None else residual)
        return sampled[-1]

    def recording_filter(logits, top_k, top_p):
        post_cfg.append(logits.float().clone())
        return original_filter(logits, top_k, top_p)

    def forced_draw(self, probs):
        return expected[f"gen.smooth0.stage{next(stages)}.indices"].to(probs.device)

    handle = pipe.transformer.register_forward_hook(lambda module, args, out: raw.append(out.logits.float()))
    with monkeypatch.context() as patched:
        patched.setattr(sampling_module, "top_k_top_p_filter", recording_filter)
        patched.setattr(RandomStreams, "multinomial", forced_draw)
        patched.setattr(pipeline_module, "sample_residual_tokens", head)
        image = pipe(
            meta["prompts"], guidance_scale=meta["cfg"], more_smooth=False,
            generator=torch.Generator().manual_seed(meta["seed"]), output_type="pt",
        ).images.float()  # fmt: skip
    handle.remove()
    return post_cfg, raw, sampled[0], image


@pytest.fixture(scope="module", params=CASES)
def float32_pipe(request, golden, tmp_path_factory):
    case = request.param
    pipe = from_original(golden.released_layout(case, tmp_path_factory.mktemp(case)), golden.root / "text_encoder")
    pipe.set_progress_bar_config(disable=True)
    return case, pipe


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_within_its_rounding_bounds(float32_pipe, golden, dtype, monkeypatch):
    if not _cpu_supports(dtype):
        pytest.skip(f"this CPU build has no {dtype} conv kernels")
    case, pipe = float32_pipe
    meta, expected = golden.case(case), golden.tensors(case)
    ref_logits, ref_raw, ref_residual, ref_image = _teacher_forced_run(pipe, meta, expected, monkeypatch)
    half = copy.deepcopy(pipe).to(dtype)
    logits, _, _, image = _teacher_forced_run(half, meta, expected, monkeypatch, residual=ref_residual)

    u = UNIT_ROUNDOFF[dtype]
    ratios = guidance_ratios(len(ref_logits))
    for si, (low, high, raw) in enumerate(zip(logits, ref_logits, ref_raw)):
        bound = LOGIT_ROUNDINGS * u * (1 + 2 * meta["cfg"] * ratios[si]) * raw.abs().max().item()
        error = (low - high).abs().max().item()
        assert error <= bound, f"{case} {dtype} stage {si}: logits differ by {error:.3g} > bound {bound:.3g}"
    image_error = (image - ref_image).abs().max().item()
    assert image_error <= IMAGE_ROUNDINGS * u, f"{case} {dtype}: images differ by {image_error:.3g}"
