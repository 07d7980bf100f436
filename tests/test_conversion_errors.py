"""`hart-convert` and `from_original` on inputs that cannot be converted: errors name the folder or file, and the
command prints them as one line with exit status 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CASES

from diffusers_hart.conversion import convert_hart_to_diffusers, from_original
from diffusers_hart.cli.convert import main as convert_main
from diffusers_hart.conversion.state_dict_utils import CheckpointKeyError


@pytest.fixture
def released(golden, tmp_path):
    """A writable copy of the released layout of one case."""
    root = golden.released_layout(CASES[0], tmp_path / "released")
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def _convert_error(capsys, checkpoint_path, text_encoder_path, out) -> str:
    """The one line `hart-convert` prints on stderr when it exits with status 2."""
    argv = ["--checkpoint_path", str(checkpoint_path), "--text_encoder_path", str(text_encoder_path)]
    with pytest.raises(SystemExit) as exit_info:
        convert_main([*argv, "--output_path", str(out)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hart-convert: error: "), lines
    return lines[0]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("missing", ["checkpoint", "text_encoder"])
def test_missing_folder_is_named_before_anything_is_loaded(golden, released, tmp_path, capsys, monkeypatch, missing):
    monkeypatch.setattr(convert_hart_to_diffusers, "load_tokenizer_folder", lambda *a: pytest.fail("loaded"))
    absent = tmp_path / "absent"
    paths = {"checkpoint": released, "text_encoder": golden.root / "text_encoder", missing: absent}
    with pytest.raises(FileNotFoundError, match=f"^no such folder: {absent}$"):
        from_original(paths["checkpoint"], paths["text_encoder"])
    line = _convert_error(capsys, paths["checkpoint"], paths["text_encoder"], tmp_path / "out")
    assert line == f"hart-convert: error: no such folder: {absent}"


def test_relative_and_home_text_encoder_paths_are_local(released, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ["./qwen2", "~/surely-not-a-folder-of-this-test"]:
        with pytest.raises(FileNotFoundError, match=f"^no such folder: {name}$"):
            from_original(released, name)


@pytest.mark.parametrize("file", ["tokenizer/model.safetensors", "llm/ema_model.bin", "llm/config.json"])
def test_truncated_file_is_named(golden, released, tmp_path, capsys, file):
    _truncate(released / file)
    with pytest.raises(ValueError, match=f"cannot read the (checkpoint|config) file {released / file}: "):
        from_original(released, golden.root / "text_encoder")
    line = _convert_error(capsys, released, golden.root / "text_encoder", tmp_path / "out")
    assert str(released / file) in line


def test_missing_keys_name_their_file(golden, released):
    import torch
    from safetensors.torch import load_file, save_file

    tokenizer_file = released / "tokenizer" / "model.safetensors"
    weights = load_file(str(tokenizer_file))
    del weights["vae.quantize.embedding.weight"]
    save_file(weights, str(tokenizer_file))
    with pytest.raises(CheckpointKeyError, match=f"{tokenizer_file} is missing .*vae\\.quantize\\.embedding\\.weight"):
        from_original(released, golden.root / "text_encoder")

    save_file(load_file(str(golden.root / "tokenizer" / "model.safetensors")), str(tokenizer_file))
    ema_file = released / "llm" / "ema_model.bin"
    weights = torch.load(ema_file, weights_only=True)
    del weights["diffloss.net.input_proj.bias"]
    torch.save(weights, ema_file)
    with pytest.raises(CheckpointKeyError, match=f"{ema_file} \\(diffusion head.*input_proj\\.bias"):
        from_original(released, golden.root / "text_encoder")


def test_missing_argument_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--checkpoint_path", "released"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(
        "hart-convert: error: the following arguments are required: --text_encoder_path, --output_path\n"
    )


def test_text_encoder_hub_id_not_in_the_offline_cache_is_one_line(released, tmp_path):
    """In a fresh process (the repository's script), where `HF_HUB_OFFLINE=1` takes effect."""
    script = Path(__file__).parents[1] / "conversion" / "convert_hart_to_diffusers.py"
    args = ["--checkpoint_path", str(released), "--text_encoder_path", "someone/not-in-the-cache"]
    result = subprocess.run(
        [sys.executable, str(script), *args, "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hart-convert: error: cannot load the text encoder someone/not-in-the-cache: ")
