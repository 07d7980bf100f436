"""HARTPipeline: text-to-image generation with the Hybrid Autoregressive Transformer."""

import copy
import os
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ...models.autoencoders import HARTAutoEncoder
from ...models.transformers import HARTTransformer2DModel
from ...schedulers import HARTResidualDiffusionScheduler
from .residual_sampling import sample_residual_tokens
from .sampling import (
    GeneratorArg,
    RandomStreams,
    default_top_k,
    guidance_ratios,
    smooth_token_vectors,
    top_k_top_p_filter,
)

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_hart import HARTPipeline

        >>> pipe = HARTPipeline.from_pretrained("path/to/hart-0.7b-1024px-diffusers", dtype=torch.float16)
        >>> pipe.to("cuda")
        >>> image = pipe("An astronaut riding a horse on the moon", generator=torch.Generator().manual_seed(1)).images[0]
        >>> image.save("astronaut.png")
        ```
"""

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


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
    _callback_tensor_inputs = ["f_hat"]

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

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        """Load a converted HART folder, or a Hub repo id holding one (downloaded first, then loaded locally).

        diffusers only downloads components whose library it knows, so a Hub id is fetched here with
        `huggingface_hub.snapshot_download` and the local folder is loaded.
        """
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            download_keys = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
            path = snapshot_download(path, **{k: kwargs.pop(k) for k in download_keys if k in kwargs})
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def from_original(
        cls,
        checkpoint_path: Union[str, os.PathLike],
        text_encoder_path: Union[str, os.PathLike],
        use_ema: bool = True,
        dtype: Optional[torch.dtype] = None,
    ) -> "HARTPipeline":
        """Build the pipeline straight from the original release's folders (`llm/`, `tokenizer/`) and a Qwen2 folder."""
        from ...conversion.convert_hart_to_diffusers import build_pipeline_from_original

        return build_pipeline_from_original(checkpoint_path, text_encoder_path, use_ema=use_ema, dtype=dtype)

    # ------------------------------------------------------------------ properties
    @property
    def supported_size(self) -> Tuple[int, int]:
        side = self.transformer.config.patch_nums[-1] * self.vae_scale_factor
        return side, side

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    # ------------------------------------------------------------------ text
    def _tokenize(self, texts: List[str], max_length: int, padding: str) -> torch.Tensor:
        return self.tokenizer(
            texts, padding=padding, max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def encode_prompt(
        self,
        prompt: Union[str, List[str]],
        device: Optional[torch.device] = None,
        num_images_per_prompt: int = 1,
        use_system_prompt: bool = True,
        max_sequence_length: Optional[int] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode prompts into the text context.

        Returns `(prompt_embeds, prompt_attention_mask, prompt_position_ids)`, each repeated `num_images_per_prompt`
        times: embeddings (B, L, D) in float32, the boolean mask of non-pad tokens and the RoPE position ids
        `cumsum(mask) - 1` (so an empty prompt gets -1 everywhere, as in the original).
        """
        device = device or self._execution_device
        max_length = max_sequence_length or self.transformer.config.context_length
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            input_ids = self._tokenize(prompts, max_length, "max_length")
            untruncated = self.tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
            if untruncated.shape[-1] > max_length:
                removed = self.tokenizer.batch_decode(untruncated[:, max_length:])
                logger.warning(
                    f"The following part of your input was truncated because the context holds only {max_length} "
                    f"tokens: {removed}"
                )
            prompt_attention_mask = input_ids != self.tokenizer.pad_token_id
            input_ids, prompt_attention_mask = input_ids.to(device), prompt_attention_mask.to(device)
            text_ids, text_mask = input_ids, prompt_attention_mask
            if use_system_prompt and self.config.system_prompt:
                system_ids = self._tokenize([self.config.system_prompt], max_length, "longest").to(device)
                system_ids = system_ids.expand(input_ids.shape[0], -1)
                text_ids = torch.cat([system_ids, input_ids], dim=1)
                text_mask = torch.cat([torch.ones_like(system_ids, dtype=torch.bool), prompt_attention_mask], dim=1)
            hidden = self.text_encoder(
                text_ids, attention_mask=text_mask.long(), output_hidden_states=True
            ).hidden_states[-1]
            prompt_embeds = hidden[:, text_ids.shape[1] - input_ids.shape[1] :].float()
        prompt_attention_mask = prompt_attention_mask.to(device=device, dtype=torch.bool)
        prompt_position_ids = prompt_attention_mask.long().cumsum(dim=1) - 1
        repeat = lambda t: t.repeat_interleave(num_images_per_prompt, dim=0)  # noqa: E731
        return repeat(prompt_embeds.to(device)), repeat(prompt_attention_mask), repeat(prompt_position_ids)

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
        prompt_embeds=None,
        prompt_attention_mask=None,
        negative_prompt=None,
        callback_on_step_end_tensor_inputs=None,
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
        if prompt is not None:
            if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt)):
                raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt)}.")
            if isinstance(prompt, list) and len(prompt) == 0:
                raise ValueError("`prompt` is an empty list; pass at least one prompt (an empty string is allowed).")
        if prompt_embeds is not None:
            expected = (self.transformer.config.context_length, self.transformer.config.context_dim)
            if prompt_embeds.ndim != 3 or tuple(prompt_embeds.shape[1:]) != expected:
                raise ValueError(f"`prompt_embeds` must have shape (batch, {expected[0]}, {expected[1]}), got {tuple(prompt_embeds.shape)}.")
            if prompt_attention_mask is None or prompt_attention_mask.shape != prompt_embeds.shape[:2]:
                raise ValueError("`prompt_embeds` needs a `prompt_attention_mask` of shape (batch, context_length).")
        if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
            raise ValueError(f"`negative_prompt` must be a string or a list of strings, got {type(negative_prompt)}.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        if guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0 (0 disables guidance), got {guidance_scale}.")
        if top_k is not None and top_k < 0:
            raise ValueError(f"`top_k` must be >= 0 (0 disables it), got {top_k}.")
        if not 0 <= top_p < 1:
            raise ValueError(f"`top_p` must be in [0, 1) (0 disables it), got {top_p}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}, "
                f"got {callback_on_step_end_tensor_inputs}."
            )

    # ------------------------------------------------------------------ generation
    def _unconditional_context(self, prompt_embeds, prompt_mask, prompt_position_ids, negative_prompt, encode_kwargs):
        if negative_prompt is None:
            # the original's unconditional branch: zero context, zero positions, only the first token "real"
            mask = torch.zeros_like(prompt_mask)
            mask[:, 0] = True
            return torch.zeros_like(prompt_embeds), mask, torch.zeros_like(prompt_position_ids)
        num_prompts = prompt_embeds.shape[0] // encode_kwargs["num_images_per_prompt"]
        negative = [negative_prompt] * num_prompts if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negative) != num_prompts:
            raise ValueError(f"`negative_prompt` has {len(negative)} entries for {num_prompts} prompts; give one per prompt.")
        return self.encode_prompt(negative, **encode_kwargs)

    @torch.no_grad()
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
        max_sequence_length: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[
            Union[Callable[[Any, int, int, Dict], Dict], PipelineCallback, MultiPipelineCallbacks]
        ] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["f_hat"],
    ):
        r"""
        Generate images from text.

        Args:
            prompt (`str` or `List[str]`): The prompt(s). An empty string is a valid (unconditional-like) prompt.
            negative_prompt (`str` or `List[str]`, *optional*): Replaces the zero context of the unconditional branch
                (see the class docstring). `None` reproduces the original.
            height (`int`, *optional*), width (`int`, *optional*): Must equal the model's trained size
                (`pipe.supported_size`); default to it.
            guidance_scale (`float`, defaults to 4.5): Classifier-free guidance. Scale si uses
                `guidance_scale * si / (SN - 1)`; the last scale and the diffusion head reuse the previous ratio.
            num_images_per_prompt (`int`, defaults to 1): Images per prompt.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): One generator reproduces the
                original's images for its seed: token draws use it, the residual noise a second generator seeded with
                `generator.initial_seed()`. A list gives each image its own streams.
            top_k (`int`, *optional*): Top-k filter of every scale. `None` uses the original's fixed schedule
                (600 for the first seven scales, 300 after); 0 disables it.
            top_p (`float`, defaults to 0.0): Nucleus filter; 0 disables it.
            more_smooth (`bool`, defaults to True): Feed gumbel-softmax mixtures of code vectors instead of hard codes
                (the original's default for sampling; its FID numbers use False).
            use_system_prompt (`bool`, defaults to True): Prefix `self.config.system_prompt` to every prompt.
            num_inference_steps (`int`, *optional*): Steps of the residual-diffusion head; defaults to
                `self.config.default_num_inference_steps`.
            prompt_embeds (`torch.Tensor`, *optional*), prompt_attention_mask (`torch.Tensor`, *optional*):
                Pre-computed text context (B, context_length, context_dim) and its boolean mask.
            max_sequence_length (`int`, *optional*): Text tokens; defaults to the model's `context_length`.
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" (images in [0, 1]) or "latent" (the final f-hat).
            return_dict (`bool`, defaults to True): Return an [`~pipelines.ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): Called after every scale as
                `callback_on_step_end(self, stage_index, patch_num, callback_kwargs)`; may return a new `f_hat`.
            callback_on_step_end_tensor_inputs (`List[str]`): Tensors passed in `callback_kwargs`.

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the generated images.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height = height or self.supported_size[0]
        width = width or self.supported_size[1]
        self.check_inputs(
            prompt, height, width, guidance_scale, top_k, top_p, output_type, num_images_per_prompt,
            prompt_embeds, prompt_attention_mask, negative_prompt, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        transformer, quantizer = self.transformer, self._quantizer_on(device)
        patch_nums = tuple(transformer.config.patch_nums)
        num_stages = len(patch_nums)
        self._num_timesteps = num_stages
        num_inference_steps = num_inference_steps or self.config.default_num_inference_steps

        # 1. text context, conditional rows first, then the unconditional ones
        encode_kwargs = dict(
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            use_system_prompt=use_system_prompt,
            max_sequence_length=max_sequence_length,
        )
        context, mask, position_ids = self.encode_prompt(
            prompt, prompt_embeds=prompt_embeds, prompt_attention_mask=prompt_attention_mask, **encode_kwargs
        )
        uncond = self._unconditional_context(context, mask, position_ids, negative_prompt, encode_kwargs)
        context = torch.cat([context, uncond[0]]).to(transformer.dtype)
        mask = torch.cat([mask, uncond[1]])
        position_ids = torch.cat([position_ids, uncond[2]])
        batch_size = context.shape[0] // 2

        # 2. random streams and state
        streams = RandomStreams(generator, batch_size, device)
        codebook_VC = quantizer.embedding.weight
        kv_cache = transformer.init_kv_cache(2 * batch_size, device=device)
        f_hat = torch.zeros(batch_size, codebook_VC.shape[1], patch_nums[-1], patch_nums[-1], device=device, dtype=self.vae.dtype)
        ratios = guidance_ratios(num_stages)
        next_tokens = None

        # 3. scale by scale
        with self.progress_bar(total=num_stages) as progress_bar:
            for si, pn in enumerate(patch_nums):
                if self.interrupt:
                    break
                out = transformer(
                    context, mask, position_ids,
                    latent_tokens=next_tokens, stage_index=si, kv_cache=kv_cache,
                )  # fmt: skip
                logits = out.logits[:, -1:] if si == 0 else out.logits  # stage 0: only the last text token predicts
                t = guidance_scale * ratios[si]
                logits = (1 + t) * logits[:batch_size] - t * logits[batch_size:]
                filtered = top_k_top_p_filter(logits, default_top_k(si) if top_k is None else top_k, top_p)
                idx_Bl = streams.multinomial(filtered.softmax(dim=-1))
                if more_smooth:
                    tokens_BlC = smooth_token_vectors(filtered, ratios[si], codebook_VC, streams)
                else:
                    tokens_BlC = codebook_VC[idx_Bl]
                tokens_BlC = tokens_BlC.to(f_hat.dtype)

                if si < num_stages - 1:
                    h_BChw = tokens_BlC.transpose(1, 2).reshape(batch_size, -1, pn, pn)
                    f_hat, _ = quantizer.next_autoregressive_input(si, f_hat, h_BChw, patch_nums)
                else:
                    residual_BlC = self._sample_residual(out.hidden_states, codebook_VC[idx_Bl], t, num_inference_steps, streams)
                    h_BChw = (tokens_BlC + residual_BlC.to(f_hat.dtype)).transpose(1, 2).reshape(batch_size, -1, pn, pn)
                    f_hat = f_hat + h_BChw

                if callback_on_step_end is not None:
                    available = {"f_hat": f_hat}
                    callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, si, pn, callback_kwargs)
                    f_hat = callback_outputs.pop("f_hat", f_hat)
                if si < num_stages - 1:  # from f_hat as the callback left it
                    next_pn = patch_nums[si + 1]
                    next_map = F.interpolate(f_hat, size=(next_pn, next_pn), mode="area")
                    next_tokens = next_map.flatten(2).transpose(1, 2).repeat(2, 1, 1).to(transformer.dtype)
                progress_bar.update()

        # 4. decode
        if output_type == "latent":
            image = f_hat
        else:
            image = self.vae.decode(f_hat, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def _quantizer_on(self, device: torch.device):
        """The VAE's quantizer (codebook and refinement convs) on `device`.

        Every scale needs it, but with model CPU offload the VAE only comes to the device for
        decoding; the quantizer is tiny, so a device copy keeps the encoder/decoder offloaded.
        """
        quantizer = self.vae.quantize
        if quantizer.embedding.weight.device != torch.empty(0, device=device).device:  # "cuda" means "cuda:0"
            quantizer = copy.deepcopy(quantizer).to(device)
        return quantizer

    def _sample_residual(self, hidden_states, discrete_vectors_BlC, guidance, num_inference_steps, streams):
        """Sample the continuous residual of every last-scale token with the diffusion head (CFG halves stacked)."""
        transformer = self.transformer
        two_b, l, _ = hidden_states.shape
        discrete = discrete_vectors_BlC.to(transformer.dtype).repeat(2, 1, 1)  # both halves use the conditional codes
        condition = transformer.residual_condition(hidden_states, discrete).reshape(two_b * l, -1)
        sample = sample_residual_tokens(
            transformer.diffusion_head,
            self.scheduler,
            condition,
            guidance_scale=guidance,
            draw_noise=lambda shape: streams.randn(two_b // 2, l, shape[1], shape[0] // (two_b // 2 * l), torch.float32),
            num_inference_steps=num_inference_steps,
            sample_scale=transformer.config.residual_scale,
        )
        return sample[: two_b // 2 * l].view(two_b // 2, l, -1)
