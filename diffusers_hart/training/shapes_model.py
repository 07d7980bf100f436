"""The small HART that learns the shapes benchmark: its text encoder and the configs of its tokenizer and transformer.

The release's Qwen2-1.5B text encoder is far too large to ship, so the shapes model reads prompts with a Qwen2 of
two layers whose weights stay at their seeded initialisation (frozen; the transformer learns to read it). Its
tokenizer is a byte-level BPE, like Qwen2's, whose merges are learned from the shapes captions: every word of the
benchmark's vocabulary is one token, and any other text still tokenizes, byte by byte. Word tokens spare the small
transformer from assembling words out of bytes.

    python -m diffusers_hart.training.shapes_model --output shapes-base   # text encoder + configs, for the trainers
"""

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

from .shapes import AUXILIARY_COLOURS, COLOURS, POSITIONS, SHAPES, UNNAMED_SHAPE

RESOLUTION = 64
PATCH_NUMS = (1, 2, 4, 8)  # an 8x8 latent: 64 px at the tokenizer's 8x downsampling
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SYSTEM_PROMPT = "Draw the shapes."
CONTEXT_LENGTH = 24  # the longest caption is 15 tokens
TEXT_ENCODER_SEED = 0

VAE_CONFIG = dict(
    ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=16, vocab_size=512, patch_nums=PATCH_NUMS,
)  # fmt: skip
TEXT_HIDDEN_SIZE = 128
TRANSFORMER_CONFIG = dict(
    patch_nums=PATCH_NUMS, num_layers=6, hidden_size=256, num_attention_heads=4, mlp_ratio=4.0,
    context_dim=TEXT_HIDDEN_SIZE, context_length=CONTEXT_LENGTH, vocab_size=VAE_CONFIG["vocab_size"],
    latent_channels=VAE_CONFIG["z_channels"], block_conditioning="adaln_single", diffusion_head_width=256,
    diffusion_head_depth=3,
)  # fmt: skip


def _caption_words():
    """Every word a shapes caption can use, once per line: what the BPE merges are learned from."""
    words = ["a", "at", "the", "and", UNNAMED_SHAPE, *COLOURS, *AUXILIARY_COLOURS, *SHAPES]
    words += [word for position in POSITIONS for word in position.split()]
    return sorted(set(words))


def shapes_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE whose merges make each shapes-caption word (with its leading space) a single token.

    Training on a fixed word list with a fixed vocabulary size is deterministic, so every process gets the same ids.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    words = _caption_words()
    corpus = [" ".join(words)] + [f" {word}" for word in words] * 8
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[2], padding_side="right"
    )


def shapes_text_encoder(
    tokenizer: PreTrainedTokenizerFast, seed: int = TEXT_ENCODER_SEED, per_word: bool = False
) -> Qwen2Model:
    """A two-layer Qwen2 at its seeded initialisation (frozen by the trainers: it has no `text_encoder` to train).

    `per_word=True` zeroes the attention output projections, so each token's state is a function of its own word
    alone. Random attention otherwise blends a shape word's state with the colour before it, and a colour-shape pair
    that training never showed reads as a state the transformer never saw; per-word states keep such a pair the two
    words it is made of (the transformer's 1D RoPE over the context still tells it which word comes where).
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Qwen2Model(
            Qwen2Config(
                vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN_SIZE, intermediate_size=4 * TEXT_HIDDEN_SIZE,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                pad_token_id=tokenizer.pad_token_id,
            )
        )  # fmt: skip
    finally:
        torch.random.set_rng_state(generator_state)
    if per_word:
        for layer in model.layers:
            torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
    return model.eval()


def write_base(folder, per_word_text_encoder: bool = False) -> Path:
    """Write what the trainers start from: `tokenizer/` and `text_encoder/` (for `--text_encoder_path`),
    `vae_config.json` and `transformer_config.json` (for `--vae_config` / `--transformer_config`), and
    `pipeline_config.json` (the system prompt)."""
    folder = Path(folder)
    tokenizer = shapes_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    shapes_text_encoder(tokenizer, per_word=per_word_text_encoder).save_pretrained(folder / "text_encoder")
    (folder / "vae_config.json").write_text(json.dumps(VAE_CONFIG, indent=2) + "\n")
    (folder / "transformer_config.json").write_text(json.dumps(TRANSFORMER_CONFIG, indent=2) + "\n")
    (folder / "pipeline_config.json").write_text(json.dumps({"system_prompt": SYSTEM_PROMPT}, indent=2) + "\n")
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument(
        "--per-word-text-encoder", action="store_true",
        help="zero the text encoder's attention outputs (see shapes_text_encoder)",
    )  # fmt: skip
    args = parser.parse_args()
    print(write_base(args.output, per_word_text_encoder=args.per_word_text_encoder))
