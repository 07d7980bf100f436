"""Parity of HARTAutoEncoder / HARTHybridQuantizer with the original tokenizer (golden `vae.*` tensors)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffusers_hart.conversion.state_dict_utils import CheckpointKeyError
from diffusers_hart.conversion.tokenizer_checkpoint import convert_tokenizer_checkpoint, load_tokenizer_folder
from diffusers_hart.models.autoencoders import HARTAutoEncoder


@pytest.fixture(scope="module")
def original_checkpoint(golden):
    folder = golden.root / "tokenizer"
    return json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def model(golden):
    return load_tokenizer_folder(golden.root / "tokenizer")


@pytest.fixture(scope="module")
def expected(golden):
    return golden.tensors("vae")


@pytest.fixture(scope="module")
def outputs(model, expected):
    """Every golden `vae.*` tensor, recomputed by the port from `vae.input`."""
    x = expected["vae.input"]
    with torch.no_grad():
        latent = model.encode(x).latent
        indices, frest_last = model.latent_to_indices(latent)
        fhat = model.indices_to_fhat(indices)
        forward = model(x, skip_continuous_prob=0.0)
        result = {
            "vae.encoder_out": model.encoder(x),
            "vae.latent": latent,
            "vae.frest_last": frest_last,
            "vae.fhat_discrete": fhat,
            "vae.fhat_discrete_var": model.indices_to_fhat(indices, refine_last_scale=True),
            "vae.decoded_discrete": model.decode(fhat).sample,
            "vae.decoded_continuous": model.decode(latent).sample,
            "vae.forward.out": forward.sample,
            "vae.forward.vq_loss": forward.commit_loss.reshape(1),
            "vae.teacher_forcing_input": model.teacher_forcing_input(indices),
        }
    result.update({f"vae.indices.{si}": idx for si, idx in enumerate(indices)})
    return result


def test_every_golden_tensor_is_checked(outputs, expected):
    assert set(outputs) == set(expected) - {"vae.input"}


@pytest.mark.parametrize(
    "name",
    [
        "vae.encoder_out",
        "vae.latent",
        *[f"vae.indices.{si}" for si in range(6)],
        "vae.frest_last",
        "vae.fhat_discrete",
        "vae.fhat_discrete_var",
        "vae.decoded_discrete",
        "vae.decoded_continuous",
        "vae.forward.out",
        "vae.forward.vq_loss",
        "vae.teacher_forcing_input",
    ],
)
def test_golden_parity(golden, outputs, expected, name):
    golden.assert_close(name, outputs[name], expected[name])


def test_autoregressive_steps_accumulate_fhat(golden, model, outputs, expected):
    quantize = model.quantize
    f_hat = torch.zeros_like(expected["vae.fhat_discrete"])
    with torch.no_grad():
        for si, pn in enumerate(quantize.patch_nums):
            tokens_BChw = quantize.embedding(outputs[f"vae.indices.{si}"]).transpose(1, 2).reshape(2, -1, pn, pn)
            previous = f_hat.clone()
            f_hat_next, next_input = quantize.next_autoregressive_input(si, f_hat, tokens_BChw)
            assert torch.equal(f_hat, previous), "next_autoregressive_input modified f_hat in place"
            if si + 1 < len(quantize.patch_nums):
                next_pn = quantize.patch_nums[si + 1]
                assert next_input.shape == (2, quantize.z_channels, next_pn, next_pn)
            f_hat = f_hat_next
    golden.assert_close("vae.fhat_discrete", f_hat, expected["vae.fhat_discrete"])


def test_skip_continuous_decodes_discrete_tokens(model, outputs, expected):
    with torch.no_grad():
        skipped = model(expected["vae.input"], skip_continuous_prob=1.0).sample
        discrete_only = model._decode(outputs["vae.fhat_discrete_var"])
    torch.testing.assert_close(skipped, discrete_only)


def test_training_forward_backpropagates_without_distributed(model, expected):
    model.train()
    try:
        generator = torch.Generator().manual_seed(0)
        out = model(expected["vae.input"], skip_continuous_prob=0.5, generator=generator)
        (out.sample.square().mean() + out.commit_loss).backward()
        params = (model.encoder.conv_in.weight, model.quantize.embedding.weight, model.quantize.quant_resi[0].weight)
        for param in params:
            assert param.grad is not None and param.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_save_pretrained_round_trip(model, expected, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = HARTAutoEncoder.from_pretrained(tmp_path).eval()
    x = expected["vae.input"]
    with torch.no_grad():
        latent = model.encode(x).latent
        assert torch.equal(reloaded.encode(x).latent, latent)
        assert torch.equal(reloaded.decode(latent).sample, model.decode(latent).sample)
        reloaded_indices, _ = reloaded.quantize.latent_to_indices(latent)
        for ours, theirs in zip(reloaded_indices, model.quantize.latent_to_indices(latent)[0]):
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("key", ["vae.quantize.embedding.weight", "vae.decoder.up.3.attn.1.qkv.weight"])
def test_missing_key_is_named(original_checkpoint, key):
    config, state_dict = original_checkpoint
    state_dict = {k: v for k, v in state_dict.items() if k != key}
    with pytest.raises(CheckpointKeyError, match=key.replace(".", r"\.")):
        convert_tokenizer_checkpoint(config, state_dict)


def test_extra_key_is_named(original_checkpoint):
    config, state_dict = original_checkpoint
    extra = "vae.encoder.mid.attn_2.qkv.weight"
    with pytest.raises(CheckpointKeyError, match=extra.replace(".", r"\.")):
        convert_tokenizer_checkpoint(config, {**state_dict, extra: torch.zeros(1)})


@pytest.mark.parametrize(
    "option, value",
    [("quantizer_type", "var"), ("double_decoder", True), ("using_znorm", True), ("hybrid", False), ("new_flag", 1)],
)
def test_unsupported_config_option_is_named(original_checkpoint, option, value):
    config, state_dict = original_checkpoint
    with pytest.raises(ValueError, match=option):
        convert_tokenizer_checkpoint({**config, option: value}, state_dict)
