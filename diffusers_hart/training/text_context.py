"""Text context of training captions: the frozen text encoder through `HARTPipeline.encode_prompt`, optionally
cached on disk so that later epochs read the context instead of running the encoder again.

The context is what generation sees for the same prompt (system prompt, padding, truncation, mask): the encoding is
`encode_prompt(..., do_classifier_free_guidance=False)`. Classifier-free-guidance dropout is not applied here; the
transformer's training step zeroes whole context rows itself.

The cache holds one safetensors file per caption, named by a hash of the caption, under a folder named by a
fingerprint of the encoder (its config, tokenizer, system prompt, context length and a checksum of its weights):
a changed encoder writes a new folder instead of reading stale context. Files are written to a temporary name and
renamed into place, so processes of a multi-GPU run may fill one cache together and a crash leaves no torn file.
Each file stores the float32 context exactly as computed (context_length x hidden_size x 4 bytes per caption: about
1.8 MB at the released model's 300 x 1536), so cached and fresh runs give the same losses.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import load_file, save_file

_CACHE_VERSION = 1
_EMBEDS_KEY = "prompt_embeds"
_MASK_KEY = "prompt_attention_mask"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encoder_fingerprint(pipeline, context_length: int, autocast_dtype: Optional[torch.dtype] = None) -> str:
    """A hash of everything that changes the context of a caption (see the module docstring)."""
    text_encoder, tokenizer = pipeline.text_encoder, pipeline.tokenizer
    parameters = list(text_encoder.parameters())
    # About 4096 values of the first and last weights, which any fine-tune of the encoder changes: hashing all of a
    # 1.5B-parameter model at every start would take minutes. Read exactly on the CPU, so every device agrees.
    checksum = [
        _sha256(p.detach().flatten()[:: max(1, p.numel() // 4096)].float().cpu().numpy().tobytes().hex())
        for p in (parameters[:1] + parameters[-1:])
    ]
    description = {
        "version": _CACHE_VERSION,
        "encoder": type(text_encoder).__name__,
        "encoder_config": text_encoder.config.to_dict(),
        "tokenizer": type(tokenizer).__name__,
        "vocab": _sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True)),
        "system_prompt": pipeline.config.system_prompt,
        "context_length": context_length,
        "autocast": str(autocast_dtype),
        "weights": checksum,
    }
    return _sha256(json.dumps(description, sort_keys=True, default=str))[:16]


class TextContextEncoder:
    """Encodes captions into `(prompt_embeds (B, L, D) float32, prompt_attention_mask (B, L) bool)` on `device`.

    Args:
        pipeline (`HARTPipeline`): Supplies the tokenizer, the frozen text encoder, the system prompt and, through
            its transformer, the context length.
        device (`torch.device`): Where the returned tensors live (the encoder should be there too).
        cache_dir (`str` or `os.PathLike`, *optional*): Cache folder (see the module docstring); None encodes every
            time.
        autocast_dtype (`torch.dtype`, *optional*): Run the encoder under autocast to this dtype (the run's mixed
            precision), leaving its weights as loaded, so that the pipeline saved at the end holds them unchanged.
    """

    def __init__(
        self,
        pipeline,
        device: Union[str, torch.device],
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        autocast_dtype: Optional[torch.dtype] = None,
    ):
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.context_length = pipeline.transformer.config.context_length
        self.autocast_dtype = None if autocast_dtype == torch.float32 else autocast_dtype
        self.cache_dir = None
        if cache_dir is not None:
            fingerprint = encoder_fingerprint(pipeline, self.context_length, self.autocast_dtype)
            self.cache_dir = Path(cache_dir) / fingerprint
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Counts of this process, for logs and tests: captions encoded and captions read from the cache.
        self.num_encoded = 0
        self.num_cached = 0

    @torch.no_grad()
    def _encode(self, captions: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        autocast = torch.autocast(self.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None)
        with autocast:
            embeds, mask, _, _ = self.pipeline.encode_prompt(
                captions, do_classifier_free_guidance=False, device=self.device, max_sequence_length=self.context_length
            )
        self.num_encoded += len(captions)
        return embeds.float(), mask

    def _path(self, caption: str) -> Path:
        key = _sha256(caption)
        return self.cache_dir / key[:2] / f"{key}.safetensors"

    def __call__(self, captions: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        captions = list(captions)
        if self.cache_dir is None:
            return self._encode(captions)
        cached = {}
        for caption in dict.fromkeys(captions):  # each distinct caption once, in order
            path = self._path(caption)
            if path.is_file():
                cached[caption] = load_file(path)
        missing = [caption for caption in dict.fromkeys(captions) if caption not in cached]
        if missing:
            embeds, mask = self._encode(missing)
            for caption, embeds_LD, mask_L in zip(missing, embeds, mask):
                entry = {_EMBEDS_KEY: embeds_LD.cpu().contiguous(), _MASK_KEY: mask_L.cpu().contiguous()}
                self._write(self._path(caption), entry)
                cached[caption] = entry
        self.num_cached += len(captions) - len(missing)
        embeds = torch.stack([cached[caption][_EMBEDS_KEY] for caption in captions]).to(self.device)
        mask = torch.stack([cached[caption][_MASK_KEY] for caption in captions]).to(self.device, torch.bool)
        return embeds, mask

    @staticmethod
    def _write(path: Path, entry) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(entry, str(temporary))
        os.replace(temporary, path)
