"""HARTAutoEncoder's memory levers: sliced and tiled decoding (diffusers' `AutoencoderMixin` switches), channels-last
decoding on CUDA."""

import pytest
import torch
from diffusers.models.autoencoders.vae import AutoencoderMixin

from diffusers_hart import HARTAutoEncoder
from diffusers_hart.models.autoencoders.autoencoder_hart import _tile_starts
from diffusers_hart.pipelines.hart.tiny import tiny_random_pipeline

# Sliced and batched decodes are different conv calls, whose CPU kernels round differently with the batch size
# (measured: up to 1e-5 here). 1e-4 is the golden README's bound for decoded images, ten times the float32 noise.
BATCH_ATOL = 1e-4


def _tiny_vae() -> HARTAutoEncoder:
    # two levels: 2x upsampling keeps a 16 x 16 latent (a 32 px image) cheap to decode in pieces
    torch.manual_seed(0)
    return HARTAutoEncoder(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=4, vocab_size=32, patch_nums=(1, 2, 4)).eval()


@pytest.fixture(scope="module")
def vae():
    return _tiny_vae()


def _latents(batch_size, side, seed=0):
    return torch.randn(batch_size, 4, side, side, generator=torch.Generator().manual_seed(seed))


def test_the_switches_are_diffusers_autoencoder_ones(vae):
    assert isinstance(vae, AutoencoderMixin)
    assert not vae.use_slicing and not vae.use_tiling
    vae.enable_slicing()
    vae.enable_tiling()
    assert vae.use_slicing and vae.use_tiling
    vae.disable_slicing()
    vae.disable_tiling()
    assert not vae.use_slicing and not vae.use_tiling


def test_sliced_decode_decodes_every_image_alone(vae):
    z = _latents(3, 4)
    with torch.no_grad():
        batched = vae.decode(z).sample
        alone = torch.cat([vae.decode(z[i : i + 1]).sample for i in range(3)])
        vae.enable_slicing()
        try:
            sliced = vae.decode(z).sample
        finally:
            vae.disable_slicing()
    assert torch.equal(sliced, alone)
    # not bit-identical to the batched decode on CPU float32 (see BATCH_ATOL), but within its rounding
    torch.testing.assert_close(sliced, batched, atol=BATCH_ATOL, rtol=0)


def test_sliced_encode_encodes_every_image_alone(vae):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        alone = torch.cat([vae.encode(images[i : i + 1]).latent for i in range(2)])
        vae.enable_slicing()
        try:
            sliced = vae.encode(images).latent
        finally:
            vae.disable_slicing()
    assert torch.equal(sliced, alone)


def test_tile_starts_cover_the_latent_evenly():
    assert _tile_starts(16, 8, 6) == [0, 4, 8]  # three tiles, the last ending at the edge
    assert _tile_starts(8, 8, 6) == [0] and _tile_starts(5, 8, 6) == [0]
    for size, tile, stride in [(64, 32, 28), (64, 36, 28), (21, 8, 5), (100, 17, 3)]:
        starts = _tile_starts(size, tile, stride)
        assert starts[0] == 0 and starts[-1] + tile == size
        steps = [b - a for a, b in zip(starts, starts[1:])]
        assert all(0 < step <= stride for step in steps), (size, tile, stride, steps)
        assert len(starts) == -(-(size - tile) // stride) + 1  # no more tiles than the stride asks for


def _tiling(vae, tile_latents=8, stride_latents=6):
    factor = vae.spatial_compression_ratio
    vae.enable_tiling(tile_latents * factor, tile_latents * factor, stride_latents * factor, stride_latents * factor)


def test_a_tile_as_large_as_the_latent_is_the_whole_decode(vae):
    z = _latents(2, 8)
    with torch.no_grad():
        whole = vae.decode(z).sample
        _tiling(vae)  # tiles of 8 latents: the 8 x 8 latent is one tile
        try:
            tiled = vae.decode(z).sample
        finally:
            vae.disable_tiling()
    assert torch.equal(tiled, whole)


def test_tiled_decode_is_a_convex_blend_of_its_tiles(vae):
    """Each pixel of the tiled decode is a weighted mean of the tiles covering it, with weights summing to 1.

    That is the tolerance an overlap-blend allows: per pixel, the tiled decode is no further from the whole decode
    than the worst covering tile, up to float32 rounding of the mean (1e-6 here); where a single tile covers a pixel,
    it is that tile's decode exactly. How far a tile is from the whole decode depends on the weights: a tile's
    group norms and lowest-resolution attention see only the tile (a random-weight decoder differs by O(1), a trained
    one far less), so no fixed closeness to the whole decode is asserted.
    """
    z = _latents(1, 16)
    factor, tile = vae.spatial_compression_ratio, 8
    starts = [0, 4, 8]  # 16 latents in tiles of 8, stride at most 6
    with torch.no_grad():
        whole = vae.decode(z).sample
        _tiling(vae)
        try:
            tiled = vae.decode(z).sample
        finally:
            vae.disable_tiling()
        worst = torch.zeros_like(whole)
        coverage = torch.zeros(whole.shape[-2:], dtype=torch.int64)
        tiles = {}
        for r in starts:
            for c in starts:
                raw = vae._decode(z[:, :, r : r + tile, c : c + tile])
                decoded = raw.clamp(-1, 1)
                region = (slice(r * factor, (r + tile) * factor), slice(c * factor, (c + tile) * factor))
                worst[:, :, region[0], region[1]] = torch.maximum(
                    worst[:, :, region[0], region[1]], (decoded - whole[:, :, region[0], region[1]]).abs()
                )
                coverage[region] += 1
                tiles[(r, c)] = raw
    assert ((tiled - whole).abs() <= worst + 1e-6).all()
    # latents 0..3 of both axes are covered by the first tile alone: there the tiled decode is that tile's
    alone = slice(0, 4 * factor)
    assert (coverage[alone, alone] == 1).all()
    assert torch.equal(tiled[:, :, alone, alone], tiles[(0, 0)][:, :, alone, alone].clamp(-1, 1))
    # where two tiles overlap the weights ramp linearly: over columns of latents 4..7 (tiles at 0 and 4), rows of the
    # first tile alone, the second tile's weight rises as (x + 0.5) / overlap and the first's falls as 1 minus that.
    # The decoder's raw outputs are blended and the blend clamped, as a whole decode clamps its output; a clamped blend
    # still lies between the clamped tiles (clamping is monotone), which is why the bound above holds.
    overlap = 4 * factor
    rising = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
    columns = slice(4 * factor, 8 * factor)
    expected = tiles[(0, 0)][:, :, alone, columns] * (1 - rising) + tiles[(0, 4)][:, :, alone, slice(0, overlap)] * rising
    torch.testing.assert_close(tiled[:, :, alone, columns], expected.clamp(-1, 1), atol=1e-6, rtol=0)
    # and the tiles do differ from the whole decode, so the bound above is not vacuous
    assert worst.max() > 1e-2


def _largest_activation(vae, z):
    largest = [0]

    def record(module, args, output):
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel())

    handles = [m.register_forward_hook(record) for m in vae.decoder.modules()]
    with torch.no_grad():
        vae.decode(z)
    for handle in handles:
        handle.remove()
    return largest[0]


def test_tiling_and_slicing_lower_the_largest_activation(vae):
    z = _latents(2, 16)
    whole = _largest_activation(vae, z)
    vae.enable_slicing()
    try:
        sliced = _largest_activation(vae, z)
        _tiling(vae)
        tiled = _largest_activation(vae, z)
    finally:
        vae.disable_slicing()
        vae.disable_tiling()
    assert sliced * 2 == whole  # one image of two
    assert tiled * 8 == whole  # one image, and a tile of (8/16)^2 of its area


@pytest.mark.parametrize(
    "settings", [dict(tile_sample_min_height=100), dict(tile_sample_stride_width=576), dict(tile_sample_stride_height=0)]
)
def test_bad_tile_settings_are_refused(settings):
    vae = HARTAutoEncoder(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=4, vocab_size=32, patch_nums=(1, 2, 4))
    with pytest.raises(ValueError, match="tile"):
        vae.enable_tiling(**settings)
    assert not vae.use_tiling


def test_pipeline_images_with_a_sliced_vae():
    pipe = tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), output_type="pt").images

    batched = images()
    pipe.vae.enable_slicing()
    torch.testing.assert_close(images(), batched, atol=BATCH_ATOL, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_channels_last_decode_on_cuda_gives_the_same_images():
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # float32 convolutions, to compare at float32 precision
    try:
        z = _latents(2, 8).cuda()
        decoded = {}
        for dtype in (torch.float32, torch.bfloat16):
            vae = tiny_random_pipeline().vae.to("cuda", dtype)
            with torch.no_grad():
                for channels_last in (False, True):
                    vae.use_channels_last = channels_last
                    decoded[dtype, channels_last] = vae.decode(z.to(dtype)).sample
                assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
                vae.use_channels_last = False  # back to the contiguous decode, weights included
                again = vae.decode(z.to(dtype)).sample
            assert vae.decoder.conv_in.weight.is_contiguous()
            if dtype == torch.float32:
                torch.testing.assert_close(again, decoded[dtype, False], atol=BATCH_ATOL, rtol=0)
            assert decoded[dtype, True].is_contiguous()
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    # float32: other convolution algorithms, same numbers up to their rounding (measured 2e-5 on an H200)
    reference = decoded[torch.float32, False]
    torch.testing.assert_close(decoded[torch.float32, True], reference, atol=1e-4, rtol=0)
    # bfloat16 rounds far more (measured max 0.14, mean 0.008 from float32 on an H200, either format): channels-last
    # must stay as close to float32 as the contiguous decode is
    error = {cl: (decoded[torch.bfloat16, cl].float() - reference).abs().mean() for cl in (False, True)}
    assert error[True] <= 1.25 * error[False]


def test_turning_channels_last_off_makes_the_weights_contiguous_again(monkeypatch):
    # The switch only acts on CUDA; letting it act on the CPU here runs the same conversions without a GPU.
    monkeypatch.setattr(HARTAutoEncoder, "_channels_last_device_types", ("cpu",))
    vae = _tiny_vae()  # its own: the module's fixture must keep its contiguous weights
    z = _latents(1, 8)
    weights = [vae.decoder.conv_in.weight, vae.post_quant_conv.weight]
    with torch.no_grad():
        contiguous = vae.decode(z).sample
        vae.use_channels_last = True
        channels_last = vae.decode(z).sample
        assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights)
        vae.use_channels_last = False
        again = vae.decode(z).sample
    weights = [vae.decoder.conv_in.weight, vae.post_quant_conv.weight]
    assert all(w.is_contiguous() for w in weights)  # before the fix they stayed channels-last
    assert channels_last.is_contiguous()
    torch.testing.assert_close(channels_last, contiguous, atol=BATCH_ATOL, rtol=0)
    torch.testing.assert_close(again, contiguous, atol=0, rtol=0)
