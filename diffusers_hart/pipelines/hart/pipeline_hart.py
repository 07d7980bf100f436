"""HARTPipeline: text-to-image generation with the Hybrid Autoregressive Transformer."""

import copy
import itertools
import math
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging, replace_example_docstring
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ...models.autoencoders import HARTAutoEncoder
from ...models.transformers import HARTTransformer2DModel
from ...schedulers import HARTResidualDiffusionScheduler
from ...utils import existing_folder, names_local_path
from .residual_sampling import sample_residual_tokens
from .sampling import GeneratorArg, RandomStreams, default_top_k, guidance_ratios, sample_stage_tokens
from .stage_runner import CUDAGraphStageRunner, EagerStageRunner

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_hart import HARTPipeline

        >>> pipe = HARTPipeline.from_pretrained("path/to/hart-0.7b-1024px-diffusers", dtype=torch.bfloat16)
        >>> pipe.to("cuda")
        >>> image = pipe("An astronaut riding a horse on the moon", generator=torch.Generator().manual_seed(1)).images[0]
        >>> image.save("astronaut.png")
        ```
"""

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Characters of truncated prompt text quoted in the warning: enough to recognise it, not a page of text.
TRUNCATION_QUOTE_CHARS = 200


def text_position_ids(attention_mask_BL: torch.Tensor) -> torch.LongTensor:
    """Text RoPE positions `cumsum(mask) - 1`: 0..n-1, then n-1 on pads (an all-pad prompt gets -1 everywhere)."""
    return attention_mask_BL.long().cumsum(dim=1) - 1


class TextEncoderInputs(NamedTuple):
    """A tokenized batch of prompts: `input_ids` and `attention_mask` (B, S) of the system prompt followed by the
    prompt, which the text encoder reads, and `prompt_attention_mask` (B, L), the prompt's own non-pad tokens: the
    context keeps the encoder's last L states."""

    input_ids: torch.LongTensor
    attention_mask: torch.BoolTensor
    prompt_attention_mask: torch.BoolTensor


def tokenize_for_text_encoder(
    tokenizer: PreTrainedTokenizerBase, prompts: List[str], max_length: int, system_prompt: str = ""
) -> TextEncoderInputs:
    """`HARTPipeline.text_encoder_inputs` on the CPU, from the tokenizer and the system prompt alone (a data loader's
    workers run it for a trainer; `HARTPipeline.text_encoder_inputs` has the details)."""

    def tokenize(texts: List[str], padding: str) -> torch.LongTensor:
        return tokenizer(texts, padding=padding, max_length=max_length, truncation=True, return_tensors="pt").input_ids

    input_ids = tokenize(prompts, "max_length")
    untruncated = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] > max_length:
        removed = " | ".join(tokenizer.batch_decode(untruncated[:, max_length:], skip_special_tokens=True))
        if len(removed) > TRUNCATION_QUOTE_CHARS:
            removed = removed[:TRUNCATION_QUOTE_CHARS] + "..."
        logger.warning(
            f"The following part of your input was truncated because the context holds only {max_length} "
            f"tokens: {removed!r}"
        )
    attention_mask = input_ids != tokenizer.pad_token_id
    if not system_prompt:
        return TextEncoderInputs(input_ids, attention_mask, attention_mask)
    system_ids = tokenize([system_prompt], "longest").expand(input_ids.shape[0], -1)
    text_ids = torch.cat([system_ids, input_ids], dim=1)
    text_mask = torch.cat([torch.ones_like(system_ids, dtype=torch.bool), attention_mask], dim=1)
    return TextEncoderInputs(text_ids, text_mask, attention_mask)


def context_from_text_encoder(text_encoder: PreTrainedModel, inputs: TextEncoderInputs) -> torch.Tensor:
    """The context (B, L, D), float32: the text encoder's last hidden states of the prompt's tokens."""
    hidden = text_encoder(inputs.input_ids, attention_mask=inputs.attention_mask.long(), output_hidden_states=True)
    num_prompt_tokens = inputs.prompt_attention_mask.shape[1]
    return hidden.hidden_states[-1][:, inputs.input_ids.shape[1] - num_prompt_tokens :].float()


def _has_offload_hooks(module: torch.nn.Module) -> bool:
    """Whether accelerate hooks move this module's weights (model or sequential CPU offload)."""
    return any(hasattr(submodule, "_hf_hook") for submodule in module.modules())


def _micro_batches(num_images: int, max_batch_size: Optional[int]) -> List[slice]:
    """Consecutive rows of at most `max_batch_size` images, as even as possible: 10 with 8 give 5 + 5, not 8 + 2
    (an even split keeps every micro-batch equally efficient, and makes at most two sizes for CUDA graphs)."""
    if max_batch_size is None or num_images <= max_batch_size:
        return [slice(0, num_images)]
    count = -(-num_images // max_batch_size)
    size, larger = divmod(num_images, count)
    bounds = list(itertools.accumulate([size + (i < larger) for i in range(count)], initial=0))
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


class HARTPipeline(DiffusionPipeline):
    r"""
    Text-to-image generation with HART (arXiv 2410.10812).

    A Qwen2 text encoder reads the prompt (after a system prompt); the transformer predicts the
    tokenizer's discrete token maps scale by scale with classifier-free guidance; at the last
    scale a small diffusion head samples the continuous residual of every token; the
    autoencoder decodes discrete + residual latents into the image.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): Tokenizer of the text encoder.
        text_encoder ([`~transformers.PreTrainedModel`]): A Qwen2 model; its last hidden states (after the final norm)
            are the text context.
        transformer ([`HARTTransformer2DModel`]): Next-scale token predictor with its residual-diffusion head.
        vae ([`HARTAutoEncoder`]): The hybrid tokenizer that owns the codebook and decodes latents to images.
        scheduler ([`HARTResidualDiffusionScheduler`]): Sampler of the residual-diffusion head.
        system_prompt (`str`): Text placed before every prompt when `use_system_prompt=True`. It is saved in
            `model_index.json`; the conversion script stores the original release's one.
        default_num_inference_steps (`int`): Steps of the residual-diffusion head when a call does not say
            (the released config's `num_sampling_steps`).

    Unconditional branch and `negative_prompt`: HART was trained with condition dropout that replaces the text
    context by zeros, so by default the unconditional branch of classifier-free guidance is an all-zero context
    (what the original does). A `negative_prompt` replaces that zero context by the encoded negative prompt. The
    model never saw text there during training, so treat it as an experimental control, not a calibrated one.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: PreTrainedModel,
        transformer: HARTTransformer2DModel,
        vae: HARTAutoEncoder,
        scheduler: HARTResidualDiffusionScheduler,
        system_prompt: str = "",
        default_num_inference_steps: int = 8,
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
        )
        self.register_to_config(system_prompt=system_prompt, default_num_inference_steps=default_num_inference_steps)
        self.vae_scale_factor = 2 ** (len(vae.config.ch_mult) - 1) if vae is not None else 16
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ loading and placement
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        """Load a converted HART folder, or a Hub repo id holding one (downloaded first, then loaded locally).

        diffusers only downloads components whose library it knows, so a Hub id is fetched here with
        `huggingface_hub.snapshot_download` and the local folder is loaded.

        Raises:
            `FileNotFoundError`: the argument names a local path (absolute, `./`, `~`, or inside an existing folder)
                that does not exist, or a Hub id that is not in the local cache while offline.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if names_local_path(path) or os.path.isdir(path):
            path = str(existing_folder(path))
        else:
            from huggingface_hub import snapshot_download

            download_keys = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
            try:
                path = snapshot_download(path, **{k: kwargs.pop(k) for k in download_keys if k in kwargs})
            except LocalEntryNotFoundError:
                raise FileNotFoundError(
                    f"{path} is not in the local Hugging Face cache and the Hub cannot be reached (offline); "
                    "download it with `huggingface-cli download` while online, or convert a released checkpoint "
                    "with `hart-convert` and pass the folder"
                ) from None
        return super().from_pretrained(path, **kwargs)

    def to(self, *args, **kwargs):
        """`DiffusionPipeline.to`, keeping the text encoder's rotary frequencies in float32 across dtype casts.

        `from_pretrained(dtype=...)` leaves transformers' `inv_freq` buffers in float32; a plain module cast would
        round them too, and the two ways of asking for one dtype would give different images. The diffusers
        warning that float16 "cannot run" on CPU is silenced: every op of this pipeline has CPU float16 kernels.
        """
        encoder = self.text_encoder
        saved = {}
        if encoder is not None:
            saved = {name: b.clone() for name, b in encoder.named_buffers() if name.endswith("inv_freq")}
        kwargs.setdefault("silence_dtype_warnings", True)
        super().to(*args, **kwargs)
        for name, buffer in saved.items():
            owner, attribute = encoder.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            current = getattr(owner, attribute)
            if current.device.type != "meta":
                setattr(owner, attribute, buffer.to(current.device))
        return self

    def enable_cuda_graphs(self):
        """Replay each transformer stage as a CUDA graph when the pipeline runs on CUDA (see `stage_runner.py`).

        The first call of each batch size captures its 14 stages (about as long as one eager call); later calls replay
        them, with the KV cache and input buffers kept between calls. The size is the micro-batch's (`max_batch_size`
        of `__call__`), so a large batch run in micro-batches replays the graphs of the micro-batch size; an uneven
        split captures two sizes. Each size keeps its KV cache, its prompt-condition buffers and its stages' outputs
        allocated (about 28 GiB at batch 16 at the release's size, where they did not fit beside the KV cache on a
        141 GB card; 0.7 GiB more at batch 1). The prompt-only work (`HARTTransformer2DModel.prepare_condition`) runs
        eagerly once per generation and is copied into the buffers the graphs read. Graphs read the weights where
        they are: call `disable_cuda_graphs()` and this again after replacing the transformer's parameters (loading
        others, moving it to another device or dtype).
        """
        self._stage_runners = {}

    def disable_cuda_graphs(self):
        """Run the transformer eagerly again and free the captured graphs and their buffers."""
        self._stage_runners = None

    def _stage_runner(self, batch_rows: int, device: torch.device):
        runners = getattr(self, "_stage_runners", None)
        # graphs replay fixed weight addresses, which offloading moves at every forward
        if runners is None or device.type != "cuda" or _has_offload_hooks(self.transformer):
            return EagerStageRunner(self.transformer, batch_rows, device)
        key = (batch_rows, device, self.transformer.dtype)
        if key not in runners:
            runners[key] = CUDAGraphStageRunner(self.transformer, batch_rows, device)
        return runners[key]

    # ------------------------------------------------------------------ properties
    @property
    def supported_size(self) -> Tuple[int, int]:
        side = self.transformer.config.patch_nums[-1] * self.vae_scale_factor
        return side, side

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        # HART guides with (1 + g) * cond - g * uncond: g = 0 is the purely conditional model
        return self._guidance_scale != 0

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    # ------------------------------------------------------------------ text
    def _context_length(self, max_sequence_length: Optional[int]) -> int:
        if self.transformer is not None:
            return self.transformer.config.context_length
        if max_sequence_length is None:
            raise ValueError(
                "This pipeline has no transformer to read the context length from; pass `max_sequence_length`."
            )
        return max_sequence_length

    def text_encoder_inputs(
        self, prompts: List[str], max_length: int, use_system_prompt: bool = True, device=None
    ) -> TextEncoderInputs:
        """Tokenize prompts as `encode_prompt` does (system prompt first, padding, truncation with a warning); a
        trainer that trains the text encoder runs `context_from_text_encoder(text_encoder, inputs)` on them with gradients."""
        system_prompt = self.config.system_prompt if use_system_prompt else ""
        inputs = tokenize_for_text_encoder(self.tokenizer, prompts, max_length, system_prompt)
        return TextEncoderInputs(*(tensor.to(device) for tensor in inputs))

    def _encode_texts(self, prompts: List[str], max_length: int, use_system_prompt: bool, device):
        inputs = self.text_encoder_inputs(prompts, max_length, use_system_prompt, device)
        # HART's text encoder is frozen. Outside `__call__` (a user's own `encode_prompt` call) grad mode may be on,
        # and the returned context would keep the whole forward's activations alive through its autograd graph:
        # 30 GiB for 16 prompts at the release's size, held for as long as the user keeps the embeddings.
        with torch.no_grad():
            return context_from_text_encoder(self.text_encoder, inputs), inputs.prompt_attention_mask

    def encode_prompt(
        self,
        prompt: Union[str, List[str], None],
        negative_prompt: Optional[Union[str, List[str]]] = None,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        device: Optional[torch.device] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        use_system_prompt: bool = True,
        max_sequence_length: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Encode prompts into the text context of the conditional and unconditional branches.

        Needs only the tokenizer and the text encoder (pass `max_sequence_length` when the pipeline has no
        transformer). The outputs passed to `__call__` under the same names reproduce its images. HART's text encoder
        is frozen: it runs without gradients whatever the grad mode, so the outputs hold no autograd graph.

        Returns:
            `(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)`, each
            repeated `num_images_per_prompt` times: float32 embeddings (B, L, D) and boolean masks of the non-pad
            tokens. Without `negative_prompt` the unconditional branch is the original's zero context (all-zero
            embeddings, a mask with only its first token set). The negatives are `None` when
            `do_classifier_free_guidance` is False.
        """
        device = device or self._execution_device
        max_length = self._context_length(max_sequence_length)
        repeat = lambda t: t.repeat_interleave(num_images_per_prompt, dim=0)  # noqa: E731
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, prompt_attention_mask = self._encode_texts(prompts, max_length, use_system_prompt, device)
        prompt_embeds = repeat(prompt_embeds.to(device))
        prompt_attention_mask = repeat(prompt_attention_mask.to(device=device, dtype=torch.bool))
        if not do_classifier_free_guidance:
            return prompt_embeds, prompt_attention_mask, None, None

        if negative_prompt_embeds is None and negative_prompt is not None:
            num_prompts = prompt_embeds.shape[0] // num_images_per_prompt
            negatives = [negative_prompt] * num_prompts if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != num_prompts:
                raise ValueError(
                    f"`negative_prompt` has {len(negatives)} entries for {num_prompts} prompts; give one per prompt."
                )
            negative_prompt_embeds, negative_prompt_attention_mask = self._encode_texts(
                negatives, max_length, use_system_prompt, device
            )
        if negative_prompt_embeds is None:
            # the original's unconditional branch: zero context, only the first token "real" (positions all 0)
            negative_prompt_attention_mask = torch.zeros_like(prompt_attention_mask)
            negative_prompt_attention_mask[:, 0] = True
            return prompt_embeds, prompt_attention_mask, torch.zeros_like(prompt_embeds), negative_prompt_attention_mask
        negative_prompt_embeds = repeat(negative_prompt_embeds.to(device))
        negative_prompt_attention_mask = repeat(negative_prompt_attention_mask.to(device=device, dtype=torch.bool))
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    # ------------------------------------------------------------------ checks
    def check_inputs(
        self,
        prompt,
        height,
        width,
        guidance_scale,
        top_k,
        top_p,
        output_type,
        num_images_per_prompt=1,
        generator=None,
        num_inference_steps=None,
        max_sequence_length=None,
        prompt_embeds=None,
        prompt_attention_mask=None,
        negative_prompt=None,
        negative_prompt_embeds=None,
        negative_prompt_attention_mask=None,
        callback_on_step_end_tensor_inputs=None,
        max_batch_size=None,
    ):
        if (height, width) != self.supported_size:
            raise ValueError(
                f"HART generates only at the size its model was trained for: height={self.supported_size[0]}, "
                f"width={self.supported_size[1]} (got height={height}, width={width})."
            )
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Provide only one of `prompt` and `prompt_embeds`.")
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, list):
                raise ValueError(f"`{name}` must be a string or a list of strings, got {type(value).__name__}.")
            if len(value) == 0:
                raise ValueError(f"`{name}` is an empty list; pass at least one prompt (an empty string is allowed).")
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise ValueError(
                        f"`{name}` must be a list of strings, but item {i} is {type(item).__name__} ({item!r}); "
                        "use an empty string for an empty prompt."
                    )
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Provide only one of `negative_prompt` and `negative_prompt_embeds`.")
        context_shape = (self.transformer.config.context_length, self.transformer.config.context_dim)
        for name, embeds, mask in (
            ("prompt_embeds", prompt_embeds, prompt_attention_mask),
            ("negative_prompt_embeds", negative_prompt_embeds, negative_prompt_attention_mask),
        ):
            if embeds is None:
                continue
            if embeds.ndim != 3 or tuple(embeds.shape[1:]) != context_shape:
                raise ValueError(
                    f"`{name}` must have shape (batch, {context_shape[0]}, {context_shape[1]}), got {tuple(embeds.shape)}."
                )
            if mask is None or tuple(mask.shape) != tuple(embeds.shape[:2]):
                raise ValueError(f"`{name}` needs a `{name[:-6]}attention_mask` of shape (batch, context_length).")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"`negative_prompt_embeds` {tuple(negative_prompt_embeds.shape)} must have the shape of "
                    f"`prompt_embeds` {tuple(prompt_embeds.shape)}."
                )
        if max_sequence_length is not None and max_sequence_length != context_shape[0]:
            raise ValueError(
                f"`max_sequence_length` must equal the model's context length {context_shape[0]} (got "
                f"{max_sequence_length}): the transformer was trained on contexts of exactly that many tokens."
            )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise ValueError(f"`guidance_scale` must be a number, got {type(guidance_scale).__name__}.")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a finite number >= 0 (0 disables guidance), got {guidance_scale}.")
        if num_inference_steps is not None and (
            isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 2
        ):
            raise ValueError(
                f"`num_inference_steps` (steps of the residual-diffusion head) must be an integer >= 2, "
                f"got {num_inference_steps!r}; leave it as None for the model's default."
            )
        if generator is not None:
            generators = generator if isinstance(generator, (list, tuple)) else [generator]
            if not generators or not all(isinstance(g, torch.Generator) for g in generators):
                raise ValueError(
                    f"`generator` must be a torch.Generator or a list of them, got {generator!r}; "
                    "for a seed s pass torch.Generator().manual_seed(s)."
                )
        if top_k is not None and top_k < 0:
            raise ValueError(f"`top_k` must be >= 0 (0 disables it), got {top_k}.")
        if not 0 <= top_p < 1:
            raise ValueError(f"`top_p` must be in [0, 1) (0 disables it), got {top_p}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if max_batch_size is not None and (
            isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1
        ):
            raise ValueError(
                f"`max_batch_size` must be a positive integer (images per micro-batch), got {max_batch_size!r}; "
                "leave it as None to run the whole batch at once."
            )
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}, "
                f"got {callback_on_step_end_tensor_inputs}."
            )

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: Union[str, List[str]] = None,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        guidance_scale: float = 4.5,
        num_images_per_prompt: int = 1,
        generator: GeneratorArg = None,
        top_k: Optional[int] = None,
        top_p: float = 0.0,
        more_smooth: bool = True,
        use_system_prompt: bool = True,
        num_inference_steps: Optional[int] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        max_sequence_length: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[
            Union[Callable[[Any, int, int, Dict], Dict], PipelineCallback, MultiPipelineCallbacks]
        ] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        max_batch_size: Optional[int] = None,
    ):
        r"""
        Generate images from text.

        Args:
            prompt (`str` or `List[str]`): The prompt(s). An empty string is a valid (unconditional-like) prompt.
            negative_prompt (`str` or `List[str]`, *optional*): Replaces the zero context of the unconditional branch
                (see the class docstring). `None` reproduces the original.
            height (`int`, *optional*), width (`int`, *optional*): Must equal the model's trained size
                (`pipe.supported_size`); default to it.
            guidance_scale (`float`, defaults to 4.5): Classifier-free guidance `g` of HART's
                `(1 + g) * cond - g * uncond`. Scale si uses `g * si / (SN - 1)`; the last scale and the diffusion
                head reuse the previous ratio. 0 runs the conditional branch alone (half the work).
            num_images_per_prompt (`int`, defaults to 1): Images per prompt.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): A freshly seeded generator
                reproduces the original's images for its seed: token draws use it, the residual noise a second
                generator seeded with `generator.initial_seed()`. A generator reused without reseeding moves on, so
                the next call draws new tokens and new noise. A list gives each image its own streams. A generator on
                another device than the pipeline's only seeds generators there (draws stay on the GPU; see the
                README's seed protocol).
            top_k (`int`, *optional*): Top-k filter of every scale. `None` uses the original's fixed schedule
                (600 for the first seven scales, 300 after); 0 disables it.
            top_p (`float`, defaults to 0.0): Nucleus filter; 0 disables it.
            more_smooth (`bool`, defaults to True): Feed gumbel-softmax mixtures of code vectors instead of hard codes
                (the original's default for sampling; its FID numbers use False).
            use_system_prompt (`bool`, defaults to True): Prefix `self.config.system_prompt` to every prompt.
            num_inference_steps (`int`, *optional*): Steps of the residual-diffusion head (at least 2); defaults to
                `self.config.default_num_inference_steps`.
            prompt_embeds (`torch.Tensor`, *optional*), prompt_attention_mask (`torch.Tensor`, *optional*):
                Pre-computed text context (B, context_length, context_dim) and its boolean mask (see `encode_prompt`).
            negative_prompt_embeds (`torch.Tensor`, *optional*), negative_prompt_attention_mask (`torch.Tensor`,
                *optional*): Pre-computed context of the unconditional branch and its mask.
            max_sequence_length (`int`, *optional*): Text tokens; must equal the model's `context_length` (the
                default).
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" (images in [0, 1]) or "latent" (the final f-hat).
            return_dict (`bool`, defaults to True): Return an [`~pipelines.ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): Called
                after every scale as `callback_on_step_end(self, stage_index, patch_num, callback_kwargs)`; may return
                new `latents` (the accumulated f-hat, B x C x h x w) or `prompt_embeds`. With micro-batches it is
                called for every micro-batch and scale, with that micro-batch's rows.
            callback_on_step_end_tensor_inputs (`List[str]`): Tensors passed in `callback_kwargs`, of
                `self._callback_tensor_inputs`.
            max_batch_size (`int`, *optional*): Run at most this many images (prompts x `num_images_per_prompt`) at a
                time through the transformer, the residual head and the VAE decoder; with guidance the transformer
                sees twice as many rows. Peak memory (KV cache, logits, decoder activations) scales with it, throughput
                barely: large batches are compute-bound. Micro-batches are as even as possible (10 images with 8 run
                as 5 + 5). `None` runs the whole batch at once. Images do not depend on it when `generator` is a list
                (each image draws from its own generators), up to the rounding of batched matmuls. With a single
                generator the micro-batches draw one after the other from its streams, so the images differ from an
                unsplit call's (and stay reproducible for a given seed and `max_batch_size`).

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the generated images.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height = height or self.supported_size[0]
        width = width or self.supported_size[1]
        self.check_inputs(
            prompt, height, width, guidance_scale, top_k, top_p, output_type, num_images_per_prompt, generator,
            num_inference_steps, max_sequence_length, prompt_embeds, prompt_attention_mask, negative_prompt,
            negative_prompt_embeds, negative_prompt_attention_mask, callback_on_step_end_tensor_inputs, max_batch_size,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        quantizer = self._quantizer_on(device)
        num_stages = len(self.transformer.config.patch_nums)
        self._num_timesteps = num_stages
        if num_inference_steps is None:
            num_inference_steps = self.config.default_num_inference_steps

        # 1. text context: conditional rows, then (with guidance) the unconditional ones
        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = (
            self.encode_prompt(
                prompt,
                negative_prompt,
                self.do_classifier_free_guidance,
                num_images_per_prompt=num_images_per_prompt,
                device=device,
                prompt_embeds=prompt_embeds,
                prompt_attention_mask=prompt_attention_mask,
                negative_prompt_embeds=negative_prompt_embeds,
                negative_prompt_attention_mask=negative_prompt_attention_mask,
                use_system_prompt=use_system_prompt,
                max_sequence_length=max_sequence_length,
            )
        )
        batch_size = prompt_embeds.shape[0]

        # 2. random streams, one set for the whole batch
        streams = RandomStreams(generator, batch_size, device)
        micro_batches = _micro_batches(batch_size, max_batch_size)

        # 3. scale by scale, one micro-batch after the other
        latents = []
        with self.progress_bar(total=num_stages * len(micro_batches)) as progress_bar:
            for rows in micro_batches:
                negatives = (None, None)
                if self.do_classifier_free_guidance:
                    negatives = (negative_prompt_embeds[rows], negative_prompt_attention_mask[rows])
                latents.append(
                    self._generate_latents(
                        (prompt_embeds[rows], prompt_attention_mask[rows]),
                        negatives,
                        streams.select(rows),
                        quantizer,
                        top_k=top_k,
                        top_p=top_p,
                        more_smooth=more_smooth,
                        num_inference_steps=num_inference_steps,
                        callback_on_step_end=callback_on_step_end,
                        callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                        progress_bar=progress_bar,
                    )
                )
        latents = torch.cat(latents)

        # 4. decode, as many images at a time as the micro-batches hold
        if output_type == "latent":
            image = latents
        else:
            decode_size = micro_batches[0].stop - micro_batches[0].start
            image = torch.cat(
                [self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0] for z in latents.split(decode_size)]
            )
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def _generate_latents(
        self,
        prompt: Tuple[torch.Tensor, torch.Tensor],
        negative: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]],
        streams: RandomStreams,
        quantizer,
        *,
        top_k: Optional[int],
        top_p: float,
        more_smooth: bool,
        num_inference_steps: int,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs: List[str],
        progress_bar,
    ) -> torch.Tensor:
        """The final f-hat (B, C, h, w) of one micro-batch: every scale, then the residual head at the last.

        `prompt` and `negative` are (embeds, mask) of its conditional and unconditional rows (the negatives are
        `(None, None)` without guidance). Its transformer state (KV cache, prompt condition) lives until it returns.
        """
        transformer, guidance_scale = self.transformer, self._guidance_scale
        device = self._execution_device
        patch_nums = tuple(transformer.config.patch_nums)
        num_stages = len(patch_nums)
        prompt_embeds, prompt_attention_mask = prompt
        negative_prompt_embeds, negative_prompt_attention_mask = negative
        batch_size = prompt_embeds.shape[0]
        mask = prompt_attention_mask
        if self.do_classifier_free_guidance:
            mask = torch.cat([prompt_attention_mask, negative_prompt_attention_mask])
        position_ids = text_position_ids(mask)

        def condition_of(conditional_embeds):
            # everything the transformer reads from the prompt, computed once here instead of at every scale
            context = conditional_embeds
            if self.do_classifier_free_guidance:
                context = torch.cat([conditional_embeds, negative_prompt_embeds])
            return transformer.prepare_condition(context.to(transformer.dtype), mask, position_ids)

        # f-hat accumulates in float32 whatever the model dtype
        codebook_VC = quantizer.codebook()
        run_stage = self._stage_runner(mask.shape[0], device)
        run_stage.set_condition(condition_of(prompt_embeds))
        side = patch_nums[-1]
        latents = torch.zeros(batch_size, codebook_VC.shape[1], side, side, device=device, dtype=torch.float32)
        ratios = guidance_ratios(num_stages)
        next_input = None

        for si, pn in enumerate(patch_nums):
            if self.interrupt:
                break
            next_tokens = None
            if next_input is not None:
                next_tokens = next_input.flatten(2).transpose(1, 2).to(transformer.dtype)
                if self.do_classifier_free_guidance:
                    next_tokens = next_tokens.repeat(2, 1, 1)
            out = run_stage(next_tokens, si)
            logits = out.logits[:, -1:] if si == 0 else out.logits  # stage 0: only the last text token predicts
            t = guidance_scale * ratios[si]
            idx_Bl, tokens_BlC = sample_stage_tokens(
                logits, t if self.do_classifier_free_guidance else None, default_top_k(si) if top_k is None else top_k,
                top_p, ratios[si], more_smooth, codebook_VC, streams, original_draws=device.type == "cpu",
            )  # fmt: skip
            if si == num_stages - 1:
                residual_BlC = self._sample_residual(out.hidden_states, codebook_VC[idx_Bl], t, num_inference_steps, streams)
                tokens_BlC = tokens_BlC.float() + residual_BlC
                h_BChw = tokens_BlC.transpose(1, 2).reshape(batch_size, -1, pn, pn)
            else:  # the refinement conv of earlier scales runs in the VAE's dtype
                h_BChw = tokens_BlC.transpose(1, 2).reshape(batch_size, -1, pn, pn).to(codebook_VC.dtype)
            latents, next_input = quantizer.next_autoregressive_input(si, latents, h_BChw, patch_nums)

            if callback_on_step_end is not None:
                available = {"latents": latents, "prompt_embeds": prompt_embeds}
                callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                callback_outputs = callback_on_step_end(self, si, pn, callback_kwargs)
                if "prompt_embeds" in callback_outputs:
                    prompt_embeds = callback_outputs.pop("prompt_embeds")
                    run_stage.set_condition(condition_of(prompt_embeds))
                if "latents" in callback_outputs:
                    latents = callback_outputs.pop("latents").float()
                    if si < num_stages - 1:  # the next scale reads the latents as the callback left them
                        next_pn = patch_nums[si + 1]
                        next_input = F.interpolate(latents, size=(next_pn, next_pn), mode="area")
            progress_bar.update()
        return latents

    def _quantizer_on(self, device: torch.device):
        """The VAE's quantizer (codebook and refinement convs), usable on `device`.

        Every scale needs it, but with model CPU offload the VAE only comes to the device for decoding; the
        quantizer is tiny, so a device copy keeps the encoder/decoder offloaded. Under sequential offload its
        modules bring their own weights to the device, and copying their meta tensors would fail.
        """
        quantizer = self.vae.quantize
        if _has_offload_hooks(quantizer):
            return quantizer
        if next(quantizer.parameters()).device != torch.empty(0, device=device).device:  # "cuda" means "cuda:0"
            quantizer = copy.deepcopy(quantizer).to(device)
        return quantizer

    def _sample_residual(self, hidden_states, discrete_vectors_BlC, guidance, num_inference_steps, streams):
        """Sample the continuous residual of every last-scale token with the diffusion head.

        With guidance, the conditional and unconditional rows are stacked and both use the conditional codes.
        """
        transformer = self.transformer
        rows, l, _ = hidden_states.shape
        num_images = discrete_vectors_BlC.shape[0]
        discrete = discrete_vectors_BlC.to(transformer.dtype).repeat(rows // num_images, 1, 1)
        condition = transformer.residual_condition(hidden_states, discrete).reshape(rows * l, -1)
        draws = itertools.count()

        def draw_noise(shape):
            # The original's layout whether or not the unconditional rows run: the initial noise covers the
            # conditional rows, every step's noise both halves; without guidance only the first half is used.
            copies = 1 if next(draws) == 0 else 2
            return streams.randn(num_images, l, shape[1], copies, torch.float32)[: shape[0]]

        sample = sample_residual_tokens(
            transformer.diffusion_head,
            self.scheduler,
            condition,
            guidance_scale=guidance if self.do_classifier_free_guidance else None,
            draw_noise=draw_noise,
            num_inference_steps=num_inference_steps,
            sample_scale=transformer.config.residual_scale,
        )
        return sample[: num_images * l].view(num_images, l, -1)
