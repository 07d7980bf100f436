"""The original implementation (mit-han-lab/hart), built at a diffusers_hart config with random weights, for timing.

Nothing of the original is committed here: the user supplies a checkout (`--reference-dir`). Its CUDA extension
(`hart_backend`, RMSNorm and RoPE kernels) is built in place the way its README asks, with two changes that a
current toolchain needs and that leave its code untouched:

* `mkdir hart_backend` in `hart/kernels` (its `setup.py` names that package but the checkout has no such folder);
* `TORCH_CUDA_ARCH_LIST` unset, so the build targets the card it runs on.

Under transformers 5 a `PreTrainedModel` must call `post_init()` at the end of its `__init__`; the original's
tokenizer class (`HARTAutoEncoderWithDisc`) predates that, so the call is added here, in memory. Its transformer
loads the tokenizer from disk in `__init__`; the loader is pointed at a tokenizer built in memory instead.

The original runs as its `latency_profile.py` does: float32 weights, float16 autocast, `autoregressive_infer_cfg`
(decode included, text encoder excluded), seeded through its own CUDA generator (`g_seed`).
"""

import functools
import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import torch


def build_extension(reference_dir: Path) -> None:
    """Build `hart_backend.fused_kernels` in place (skipped when it is already built)."""
    kernels = reference_dir / "hart" / "kernels"
    if any((kernels / "hart_backend").glob("fused_kernels*.so")):
        return
    (kernels / "hart_backend").mkdir(exist_ok=True)
    environment = {name: value for name, value in os.environ.items() if name != "TORCH_CUDA_ARCH_LIST"}
    subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=kernels, env=environment, check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


def _stub_scipy_stats() -> None:
    """The original imports `scipy.stats` for a training-only mask ratio; stand in when scipy is not installed."""
    try:
        importlib.import_module("scipy.stats")
    except ImportError:

        def truncnorm(*args, **kwargs):
            return None  # only training draws from it

        sys.modules["scipy"] = types.ModuleType("scipy")
        sys.modules["scipy.stats"] = types.SimpleNamespace(truncnorm=truncnorm)
        sys.modules["scipy"].stats = sys.modules["scipy.stats"]


def import_reference(reference_dir: Path) -> types.SimpleNamespace:
    """Import the original's transformer and tokenizer modules from a checkout (its extension built first)."""
    reference_dir = Path(reference_dir).resolve()
    if not (reference_dir / "hart" / "modules").is_dir():
        raise FileNotFoundError(f"{reference_dir} is not a checkout of mit-han-lab/hart (no hart/modules folder)")
    build_extension(reference_dir)
    _stub_scipy_stats()
    for path in (reference_dir, reference_dir / "hart" / "kernels"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    autoencoder = importlib.import_module("hart.modules.models.autoencoder")
    transformer = importlib.import_module("hart.modules.models.transformer.hart_transformer_t2i")
    configuration = importlib.import_module("hart.modules.models.transformer.configuration")

    tokenizer_class = autoencoder.HARTAutoEncoderWithDisc
    if not getattr(tokenizer_class, "_post_init_added", False):
        original_init = tokenizer_class.__init__

        @functools.wraps(original_init)
        def init_then_post_init(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            if type(self) is tokenizer_class:
                self.post_init()

        tokenizer_class.__init__ = init_then_post_init
        tokenizer_class._post_init_added = True
    return types.SimpleNamespace(
        tokenizer_class=tokenizer_class,
        tokenizer_config_class=autoencoder.HARTAutoEncoderWithDiscConfig,
        transformer_module=transformer,
        transformer_config_class=configuration.HARTForT2IConfig,
    )


def original_configs(transformer_config, vae_config) -> tuple:
    """HARTForT2IConfig / HARTAutoEncoderWithDiscConfig keyword dicts for diffusers_hart configs (the inverse of
    `diffusers_hart.conversion`'s translation)."""
    disable_aln = transformer_config.block_conditioning != "adaln"
    transformer = dict(
        context_token=transformer_config.context_length, context_dim=transformer_config.context_dim,
        depth=transformer_config.num_layers, embed_dim=transformer_config.hidden_size,
        num_heads=transformer_config.num_attention_heads, mlp_ratio=transformer_config.mlp_ratio,
        norm_eps=transformer_config.norm_eps, patch_nums=tuple(transformer_config.patch_nums),
        mlp_type="llama", attn_type="llama", disable_aln=disable_aln,
        shared_aln=transformer_config.block_conditioning == "adaln_single",
        use_timestep_embed=transformer_config.sinusoidal_level_embedding,
        sep_aln_pooling_mode=transformer_config.adaln_pooling, use_context_norm=transformer_config.use_context_norm,
        diff_width=transformer_config.diffusion_head_width, diff_depth=transformer_config.diffusion_head_depth,
        num_sampling_steps="8", diffusion_batch_mul=transformer_config.diffusion_batch_mul, sampler="iddpm",
    )  # fmt: skip
    tokenizer = dict(
        vocab_size=vae_config.vocab_size, z_channels=vae_config.z_channels, ch=vae_config.ch,
        ch_mult=tuple(vae_config.ch_mult), v_patch_nums=tuple(vae_config.patch_nums), quantizer_type="var_hybrid",
        hybrid=True, quant_resi=0.5, share_quant_resi=4, beta=0.25,
    )  # fmt: skip
    return transformer, tokenizer


class ReferenceGenerator:
    """The original HARTForT2I at a diffusers_hart pipeline's config, random weights, float32 on CUDA."""

    def __init__(self, reference_dir, transformer_config, vae_config):
        reference = import_reference(Path(reference_dir))
        transformer_kwargs, tokenizer_kwargs = original_configs(transformer_config, vae_config)
        tokenizer = reference.tokenizer_class(reference.tokenizer_config_class(**tokenizer_kwargs))
        # its __init__ reads the tokenizer from disk: hand it the one built here
        loader = types.SimpleNamespace(from_pretrained=lambda *args, **kwargs: tokenizer)
        module = reference.transformer_module
        saved_loader, module.HARTAutoEncoderWithDisc = module.HARTAutoEncoderWithDisc, loader
        try:
            config = reference.transformer_config_class(vae_path="in-memory", **transformer_kwargs)
            self.model = module.HARTForT2I(config).cuda().eval()
        finally:
            module.HARTAutoEncoderWithDisc = saved_loader
        self.context_length, self.context_dim = transformer_config.context_length, transformer_config.context_dim

    def context(self, batch_size: int, prompt_tokens: int = 40):
        """A text context as the original's `encode_prompts` returns it: hidden states, mask, position ids."""
        mask = torch.zeros(batch_size, self.context_length, dtype=torch.bool, device="cuda")
        mask[:, :prompt_tokens] = True
        position_ids = torch.cumsum(mask, dim=1) - 1
        hidden = torch.randn(batch_size, self.context_length, self.context_dim, device="cuda", dtype=torch.float16)
        return hidden, mask, position_ids

    @torch.inference_mode()
    def __call__(self, context, seed: int, guidance_scale: float = 4.5, more_smooth: bool = True) -> torch.Tensor:
        hidden, mask, position_ids = context
        with torch.autocast("cuda", dtype=torch.float16, cache_enabled=True):
            return self.model.autoregressive_infer_cfg(
                B=hidden.shape[0], label_B=hidden, cfg=guidance_scale, g_seed=seed, more_smooth=more_smooth,
                context_position_ids=position_ids, context_mask=mask,
            )  # fmt: skip
