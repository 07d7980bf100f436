"""A tiny random-weight HARTPipeline, built offline in memory.

It exercises every code path at 64x64 px in well under a second on a CPU; its images are
noise. The CLI offers it as `--model tiny-random` and the tests build on it.
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ...models import HARTAutoEncoder, HARTTransformer2DModel
from ...schedulers import HARTResidualDiffusionScheduler
from .pipeline_hart import HARTPipeline

TINY_SYSTEM_PROMPT = "Describe the image in detail.\nUser Prompt:\n"
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, no merges) with Qwen2's special tokens; pads on the right.

    Byte `b` has id `len(_SPECIAL_TOKENS) + b`, in every process. (`ByteLevel.alphabet()` is a set whose order
    changes from process to process; ids taken from it made a seeded `hart-generate` differ between runs.)
    """
    byte_chars = bytes_to_unicode()  # GPT-2's printable stand-in for each byte, as the ByteLevel pre-tokenizer emits
    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS)}
    vocab.update({byte_chars[byte]: len(_SPECIAL_TOKENS) + byte for byte in range(256)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=_SPECIAL_TOKENS[0], eos_token=_SPECIAL_TOKENS[2], padding_side="right"
    )


def tiny_random_pipeline(
    seed: int = 0,
    patch_nums=(1, 2, 4),
    context_length: int = 64,
    block_conditioning: str = "adaln",
) -> HARTPipeline:
    """A HARTPipeline with random weights: 4 px latent side x 16 = 64 px images."""
    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    text_encoder = Qwen2Model(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    vae = HARTAutoEncoder(
        ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=4, vocab_size=32, patch_nums=patch_nums
    ).eval()
    transformer = HARTTransformer2DModel(
        patch_nums=patch_nums,
        num_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        context_dim=32,
        context_length=context_length,
        vocab_size=32,
        latent_channels=4,
        block_conditioning=block_conditioning,
        diffusion_head_width=32,
        diffusion_head_depth=2,
    ).eval()
    with torch.no_grad():  # spread the logits so that sampling is not uniform
        transformer.proj_out.weight.normal_(std=0.5)
    return HARTPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=HARTResidualDiffusionScheduler(),
        system_prompt=TINY_SYSTEM_PROMPT,
    )
