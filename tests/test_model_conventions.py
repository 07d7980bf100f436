"""diffusers model conventions (after diffusers' `ModelTesterMixin`) for HARTAutoEncoder and HARTTransformer2DModel.

Each model gets a tiny config, seeded inputs and an `outputs` function that runs its public entry points; the mixin
checks save/load, determinism, `return_dict`, dtype casting, layerwise casting, gradient checkpointing and the
logging of config loading and `to()` against them.
"""

import copy
import json
import logging
import re
from contextlib import contextmanager
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from accelerate import cpu_offload
from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
from diffusers.models.modeling_utils import ModelMixin

from diffusers_hart import HARTPipeline
from diffusers_hart.models import HARTAutoEncoder, HARTTransformer2DModel
from diffusers_hart.pipelines.hart.tiny import tiny_random_pipeline

STORAGE_DTYPE, COMPUTE_DTYPE = torch.float8_e4m3fn, torch.bfloat16
# bfloat16 keeps 8 significant bits: one rounding has a relative error of at most 2**-8.
BF16_UNIT_ROUNDOFF = 2.0**-8
# The leaf types that layerwise casting hooks, of those these models use.
LAYERWISE_CAST_LAYERS = (nn.Conv2d, nn.Linear, nn.Embedding)
SPURIOUS_FP32_WARNING = "that should be kept in float32: []"


@contextmanager
def captured_log(logger_name: str):
    """Messages of a diffusers logger, which need not propagate to the root logger where `caplog` listens."""
    messages: List[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def cast_floats(value, dtype: torch.dtype):
    """`value` with its floating tensors (also inside lists and dicts) cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    return value


def assert_outputs_equal(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        difference = (actual[name] - expected[name]).abs().max()
        assert torch.equal(actual[name], expected[name]), f"{name}: max |diff| {difference}"


def skipped_by(name: str, patterns) -> bool:
    """Whether layerwise casting skips module `name`: a pattern matches it or one of its parents."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(re.search(pattern, prefix) for pattern in patterns for prefix in prefixes)


class ModelConventionsMixin:
    model_class: type
    # where a converted folder keeps this model
    subfolder: str
    # modules that `enable_gradient_checkpointing` must run through the checkpoint function, once per training step
    checkpointed_modules: str
    # a `skip_modules_pattern` for layerwise casting other than diffusers' default
    layerwise_casting_skip_pattern: tuple

    def init_dict(self) -> dict:
        raise NotImplementedError

    def inputs(self) -> dict:
        raise NotImplementedError

    def outputs(self, model, inputs: dict, return_dict: bool = True) -> Dict[str, torch.Tensor]:
        """Every output of the model's public entry points, by name."""
        raise NotImplementedError

    def training_loss(self, model, inputs: dict) -> torch.Tensor:
        raise NotImplementedError

    def model(self):
        torch.manual_seed(0)
        return self.model_class(**self.init_dict()).eval()

    @torch.no_grad()
    def run(self, model, inputs: dict, return_dict: bool = True) -> Dict[str, torch.Tensor]:
        return self.outputs(model, cast_floats(inputs, model.dtype), return_dict)

    def test_save_load_round_trip(self, tmp_path):
        model = self.model()
        model.save_pretrained(tmp_path)
        reloaded = self.model_class.from_pretrained(tmp_path).eval()
        inputs = self.inputs()
        assert_outputs_equal(self.run(reloaded, inputs), self.run(model, inputs))

    def test_determinism(self):
        model, inputs = self.model(), self.inputs()
        assert_outputs_equal(self.run(model, inputs), self.run(model, inputs))

    def test_return_dict_and_tuple_outputs_agree(self):
        model, inputs = self.model(), self.inputs()
        assert_outputs_equal(self.run(model, inputs, return_dict=False), self.run(model, inputs, return_dict=True))

    def test_to_dtype_and_from_pretrained_dtype_agree(self, tmp_path):
        model = self.model()
        model.save_pretrained(tmp_path)
        cast = model.to(torch.bfloat16)
        loaded = self.model_class.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
        for candidate in (cast, loaded):
            assert candidate.dtype == torch.bfloat16
            assert {p.dtype for p in candidate.parameters()} == {torch.bfloat16}
        inputs = self.inputs()
        assert_outputs_equal(self.run(loaded, inputs), self.run(cast, inputs))

    def layerwise_cast(self, model_dtype: torch.dtype, skip_modules_pattern):
        """A model in `model_dtype` under layerwise casting, and the float32 reference: the same model whose weights
        are the values layerwise casting computes with (float8-rounded where it casts, untouched elsewhere)."""
        model = self.model().to(model_dtype)
        model.enable_layerwise_casting(STORAGE_DTYPE, COMPUTE_DTYPE, skip_modules_pattern=skip_modules_pattern)
        patterns = DEFAULT_SKIP_MODULES_PATTERN if skip_modules_pattern is None else skip_modules_pattern
        patterns = tuple(patterns) + tuple(model._skip_layerwise_casting_patterns or ())
        hooked = [name for name, m in model.named_modules() if isinstance(m, LAYERWISE_CAST_LAYERS)]
        hooked = [name for name in hooked if not skipped_by(name, patterns)]
        assert hooked, "layerwise casting hooked no layer"
        for name, module in model.named_modules():
            if isinstance(module, LAYERWISE_CAST_LAYERS):
                expected = STORAGE_DTYPE if name in hooked else model_dtype
                assert {p.dtype for p in module.parameters()} == {expected}, name
        assert model.dtype == COMPUTE_DTYPE

        reference = self.model()
        state_dict = model.state_dict()
        reference.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
        return model, reference

    def check_layerwise_casting(self, model_dtype: torch.dtype, skip_modules_pattern) -> None:
        """Layerwise casting runs every entry point and stays within bfloat16 rounding of the float32 reference.

        bfloat16 rounds every op with a relative error of up to u = 2**-8; how far these errors carry depends on the
        depth and the gains of each computation, so the tolerance is not a fixed number: the reference itself, run
        in bfloat16 (its weights are float8 values, exact in bfloat16), shows for each output how far bfloat16
        rounding takes it from float32. Layerwise casting runs the same ops in bfloat16 (it may keep unhooked
        parameters, e.g. of GroupNorm, in float32), so it must stay within twice that distance, plus one rounding
        of the output itself. Discrete outputs (token indices) must equal the bfloat16 run's: float32 may
        legitimately pick the other code of a near-tie.
        """
        model, reference = self.layerwise_cast(model_dtype, skip_modules_pattern)
        inputs = cast_floats(self.inputs(), COMPUTE_DTYPE)  # the same input values for all three runs
        actual = self.run(model, inputs)
        expected = self.run(reference, inputs)
        rounded = self.run(copy.deepcopy(reference).to(COMPUTE_DTYPE), inputs)
        assert actual.keys() == expected.keys()
        for name, target in expected.items():
            if not target.is_floating_point():
                assert torch.equal(actual[name], rounded[name]), name
                continue
            error = (actual[name].float() - target).norm()
            rounding_error = (rounded[name].float() - target).norm()
            tolerance = 2 * rounding_error + BF16_UNIT_ROUNDOFF * target.norm()
            message = f"{name}: |error| {error:.3e} > {tolerance:.3e} (bf16 rounding {rounding_error:.3e})"
            assert error <= tolerance, message

    def test_layerwise_casting(self):
        # diffusers' usage: load in the compute dtype, then store the hooked layers in float8
        self.check_layerwise_casting(COMPUTE_DTYPE, skip_modules_pattern=None)

    def test_layerwise_casting_with_skipped_modules(self):
        self.check_layerwise_casting(COMPUTE_DTYPE, skip_modules_pattern=self.layerwise_casting_skip_pattern)

    def test_gradient_checkpointing(self, monkeypatch):
        """Same loss and gradients with checkpointing, and the expected modules really go through the checkpoint."""
        model, inputs = self.model().train(), self.inputs()
        loss = self.training_loss(model, inputs)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)

        checkpointed = []
        checkpoint = torch.utils.checkpoint.checkpoint

        def recording_checkpoint(function, *args, **kwargs):
            checkpointed.append(function.__self__)  # the default checkpoint function passes `module.__call__`
            return checkpoint(function, *args, **kwargs)

        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", recording_checkpoint)
        model.enable_gradient_checkpointing()
        checkpointed_loss = self.training_loss(model, inputs)
        checkpointed_loss.backward()

        torch.testing.assert_close(checkpointed_loss, loss)
        for name, param in model.named_parameters():
            if grads[name] is None:
                assert param.grad is None, name
            else:
                torch.testing.assert_close(param.grad, grads[name], msg=name)
        names = {id(module): name for name, module in model.named_modules()}
        expected = [name for name, _ in model.named_modules() if re.fullmatch(self.checkpointed_modules, name)]
        assert expected, f"no module matches {self.checkpointed_modules!r}"
        assert sorted(names[id(module)] for module in checkpointed) == sorted(expected)

    def test_unknown_config_key_is_named(self, tmp_path):
        self.model().save_pretrained(tmp_path / self.subfolder)
        config_path = tmp_path / self.subfolder / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "made_up_option": 1}))
        with captured_log("diffusers.configuration_utils") as messages:
            self.model_class.from_pretrained(tmp_path, subfolder=self.subfolder)
        assert any("made_up_option" in m and self.model_class.__name__ in m for m in messages), messages

    def test_dtype_cast_logs_no_spurious_fp32_warning(self):
        model = self.model()
        logger = logging.getLogger(ModelMixin.__module__)
        filters = list(logger.filters)
        with captured_log(ModelMixin.__module__) as messages:
            model.to(torch.bfloat16)
            model.to(dtype=torch.float32)
        assert not [m for m in messages if SPURIOUS_FP32_WARNING in m]
        assert logger.filters == filters, "to() left a filter on diffusers' logger"

    def test_declared_fp32_modules_still_warn(self):
        model = self.model()
        model._keep_in_fp32_modules = ["proj_out"]
        with captured_log(ModelMixin.__module__) as messages:
            model.to(torch.bfloat16)
        assert any("should be kept in float32: ['proj_out']" in m for m in messages), messages

    def test_other_warnings_of_to_still_pass(self):
        model = self.model()
        model.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level")
        with captured_log(ModelMixin.__module__) as messages:
            model.to("cpu", torch.bfloat16)
        assert any("is group offloaded" in m for m in messages), messages


class TestHARTAutoEncoderConventions(ModelConventionsMixin):
    model_class = HARTAutoEncoder
    subfolder = "vae"
    checkpointed_modules = r"(encoder\.down|decoder\.up)\.\d+|(encoder|decoder)\.mid"
    # the quantizer is tiny and its codebook precision-critical; diffusers' VQModel skips it too
    layerwise_casting_skip_pattern = ("quantize",)

    def init_dict(self) -> dict:
        return dict(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=4, vocab_size=32, patch_nums=(1, 2, 4))

    def inputs(self) -> dict:
        generator = torch.Generator().manual_seed(0)
        return {
            "sample": torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1,
            "latent": torch.randn(2, 4, 4, 4, generator=generator),
            "indices": [torch.randint(0, 32, (2, pn * pn), generator=generator) for pn in (1, 2, 4)],
        }

    def outputs(self, model, inputs, return_dict=True):
        sample, latent, indices = inputs["sample"], inputs["latent"], inputs["indices"]
        if return_dict:
            encoded, decoded = model.encode(sample).latent, model.decode(latent).sample
            forward = model(sample)
            reconstruction, vq_loss = forward.sample, forward.commit_loss
        else:
            (encoded,), (decoded,) = model.encode(sample, return_dict=False), model.decode(latent, return_dict=False)
            reconstruction, vq_loss = model(sample, return_dict=False)
        quantize = model.quantize
        tokenized, frest_last = model.latent_to_indices(latent)
        out = {
            "encode": encoded,
            "decode": decoded,
            "forward.sample": reconstruction,
            "forward.vq_loss": vq_loss,
            "latent_to_indices.frest_last": frest_last,
            **{f"latent_to_indices.{si}": idx for si, idx in enumerate(tokenized)},
            "indices_to_fhat": model.indices_to_fhat(indices),
            "teacher_forcing_input": model.teacher_forcing_input(indices),
            "codebook": quantize.codebook(),
        }
        # the pipeline's inference loop: code vectors of each stage added into f_hat
        f_hat = torch.zeros_like(latent)
        for si, pn in enumerate(quantize.patch_nums):
            tokens_BChw = out["codebook"][indices[si]].transpose(1, 2).reshape(latent.shape[0], -1, pn, pn)
            f_hat, out[f"next_autoregressive_input.{si}"] = quantize.next_autoregressive_input(si, f_hat, tokens_BChw)
        out["next_autoregressive_input.f_hat"] = f_hat
        return out

    def training_loss(self, model, inputs):
        out = model(inputs["sample"])
        return F.mse_loss(out.sample, inputs["sample"]) + out.commit_loss

    def test_layerwise_casting_of_a_float32_model(self):
        # the weights of the hooked layers go to float8, GroupNorm (never hooked) stays float32
        self.check_layerwise_casting(torch.float32, skip_modules_pattern=None)

    def test_codebook_goes_through_the_embedding(self):
        model, _ = self.layerwise_cast(torch.float32, skip_modules_pattern=None)
        codebook = model.quantize.codebook()
        assert codebook.dtype == COMPUTE_DTYPE
        assert model.quantize.embedding.weight.dtype == STORAGE_DTYPE  # upcast per call, stored in float8
        assert torch.equal(codebook, model.quantize.embedding.weight.to(COMPUTE_DTYPE))

    def test_codebook_under_sequential_offload(self):
        # what `enable_sequential_cpu_offload` does, with the CPU as the execution device
        model = self.model()
        expected = model.quantize.embedding.weight.detach().clone()
        cpu_offload(model, torch.device("cpu"))
        assert model.quantize.embedding.weight.device.type == "meta"
        assert torch.equal(model.quantize.codebook(), expected)


class TestHARTTransformer2DModelConventions(ModelConventionsMixin):
    model_class = HARTTransformer2DModel
    subfolder = "transformer"
    checkpointed_modules = r"transformer_blocks\.\d+"
    # the input embeddings, as diffusers' default skips patch and position embeddings
    layerwise_casting_skip_pattern = ("embed",)
    patch_nums = (1, 2, 4)

    def init_dict(self) -> dict:
        return dict(
            patch_nums=self.patch_nums,
            num_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            context_dim=32,
            context_length=8,
            vocab_size=32,
            latent_channels=4,
            diffusion_head_width=32,
            diffusion_head_depth=2,
        )

    def inputs(self) -> dict:
        generator = torch.Generator().manual_seed(0)
        mask = torch.ones(2, 8, dtype=torch.bool)
        mask[1, 5:] = False  # the second prompt is padded
        num_image_tokens = sum(pn * pn for pn in self.patch_nums[1:])
        return {
            "encoder_hidden_states": torch.randn(2, 8, 32, generator=generator),
            "encoder_attention_mask": mask,
            "encoder_position_ids": torch.arange(8).expand(2, 8),
            "latent_tokens": torch.randn(2, num_image_tokens, 4, generator=generator),
        }

    def outputs(self, model, inputs, return_dict=True):
        context = {k: v for k, v in inputs.items() if k != "latent_tokens"}

        def call(**kwargs):
            out = model(**context, **kwargs, return_dict=return_dict)
            return (out.logits, out.hidden_states, out.kv_cache) if return_dict else out

        logits, hidden_states, _ = call(latent_tokens=inputs["latent_tokens"])
        out = {"training.logits": logits, "training.hidden_states": hidden_states}
        kv_cache = model.init_kv_cache(inputs["latent_tokens"].shape[0])
        stage_tokens = [None, *inputs["latent_tokens"].split([pn * pn for pn in self.patch_nums[1:]], dim=1)]
        for si, tokens in enumerate(stage_tokens):
            logits, hidden_states, returned_cache = call(latent_tokens=tokens, stage_index=si, kv_cache=kv_cache)
            assert returned_cache is kv_cache
            out[f"stage{si}.logits"], out[f"stage{si}.hidden_states"] = logits, hidden_states
        return out

    def training_loss(self, model, inputs):
        out = model(**inputs)
        return out.logits.square().mean() + out.hidden_states.square().mean()


def test_pipeline_loading_names_unknown_config_keys(tmp_path):
    tiny_random_pipeline().save_pretrained(tmp_path)
    for subfolder in ("vae", "transformer"):
        config_path = tmp_path / subfolder / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), f"made_up_{subfolder}_option": 1}))
    with captured_log("diffusers.configuration_utils") as messages:
        HARTPipeline.from_pretrained(tmp_path)
    for subfolder, class_name in (("vae", "HARTAutoEncoder"), ("transformer", "HARTTransformer2DModel")):
        assert any(f"made_up_{subfolder}_option" in m and class_name in m for m in messages), messages
