"""The shapes model's text side: one token per caption word, and the per-word text encoder's context-free states."""

import json

import pytest
import torch
from transformers import Qwen2Model

from diffusers_hart.training.shapes_model import shapes_text_encoder, shapes_tokenizer, write_base

TOKENIZER = shapes_tokenizer()


def _word_states(encoder, caption):
    ids = TOKENIZER(caption, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(input_ids=ids).last_hidden_state[0]


@pytest.mark.parametrize(
    "caption", ["a green triangle at the top left", "a cyan shape at the bottom right and a square at the top right"]
)
def test_every_caption_word_is_one_token(caption):
    ids = TOKENIZER(caption).input_ids
    assert len(ids) == len(caption.split())
    assert TOKENIZER.decode(ids) == caption


def test_per_word_states_do_not_depend_on_the_words_before():
    # "triangle" after "green" (a pair held out of training) against after "red": the contextual encoder gives the
    # shape word a state that carries the colour; the per-word one gives it the same state either way
    states = {}
    for per_word in (False, True):
        encoder = shapes_text_encoder(TOKENIZER, per_word=per_word)
        green = _word_states(encoder, "a green triangle")
        red = _word_states(encoder, "a red triangle")
        states[per_word] = (green[2], red[2])
    torch.testing.assert_close(*states[True], rtol=0, atol=0)
    assert not torch.allclose(*states[False], atol=1e-3)


def test_per_word_encoder_is_the_seeded_one_with_attention_outputs_zeroed():
    contextual, per_word = shapes_text_encoder(TOKENIZER), shapes_text_encoder(TOKENIZER, per_word=True)
    for name, parameter in per_word.named_parameters():
        expected = contextual.get_parameter(name)
        if name.endswith("self_attn.o_proj.weight"):
            expected = torch.zeros_like(expected)
        torch.testing.assert_close(parameter, expected, rtol=0, atol=0, msg=name)


def test_write_base_saves_the_per_word_encoder_it_is_asked_for(tmp_path):
    write_base(tmp_path, per_word_text_encoder=True)
    saved = Qwen2Model.from_pretrained(tmp_path / "text_encoder")
    assert all(layer.self_attn.o_proj.weight.abs().max() == 0 for layer in saved.layers)
    assert json.loads((tmp_path / "pipeline_config.json").read_text())["system_prompt"]
