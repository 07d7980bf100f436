"""Conversion of the released checkpoint layout into a diffusers folder, and the three ways to load it."""

import json
import os

import pytest
import torch
from conftest import CASES
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

import huggingface_hub
from diffusers_hart import HARTPipeline
from diffusers_hart.conversion import from_original
from diffusers_hart.cli.convert import build_parser
from diffusers_hart.cli.convert import main as convert_main
from diffusers_hart.conversion.state_dict_utils import CheckpointKeyError


def _generate(pipe, meta, more_smooth=False):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        meta["prompts"],
        guidance_scale=meta["cfg"],
        more_smooth=more_smooth,
        generator=torch.Generator().manual_seed(meta["seed"]),
        output_type="pt",
    ).images


def _convert(golden, root, out, *extra):
    """`hart-convert` in-process; `--debug` lets its errors through as exceptions (test_conversion_errors.py checks
    the one-line form)."""
    args = ["--checkpoint_path", str(root), "--text_encoder_path", str(golden.root / "text_encoder")]
    assert convert_main([*args, "--output_path", str(out), "--debug", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def converted(golden, tmp_path_factory):
    """Each case converted once by the CLI: {case: (released_root, output_folder)}."""
    folders = {}
    for case in CASES:
        root = golden.released_layout(case, tmp_path_factory.mktemp(f"{case}_released"))
        folders[case] = (root, _convert(golden, root, tmp_path_factory.mktemp(f"{case}_diffusers")))
    return folders


@pytest.mark.parametrize("case", CASES)
def test_converted_folder_reproduces_the_original(golden, converted, case):
    meta, expected = golden.case(case), golden.tensors(case)
    pipe = HARTPipeline.from_pretrained(converted[case][1])
    golden.assert_close("gen.smooth0.image", _generate(pipe, meta), expected["gen.smooth0.image"])
    index = json.loads((converted[case][1] / "model_index.json").read_text())
    # These module paths are written into every converted folder: moving a class breaks saved folders.
    assert index["transformer"] == ["diffusers_hart.models.transformers.transformer_hart", "HARTTransformer2DModel"]
    assert index["vae"] == ["diffusers_hart.models.autoencoders.autoencoder_hart", "HARTAutoEncoder"]
    assert index["scheduler"] == ["diffusers_hart.schedulers.scheduling_hart_residual", "HARTResidualDiffusionScheduler"]
    assert index["system_prompt"] == golden.system_prompt
    assert not any(k.startswith("disc") for k in load_file(str(converted[case][1] / "vae" / "diffusion_pytorch_model.safetensors")))


def test_round_trip_and_all_loading_routes_agree(golden, converted, tmp_path):
    case = CASES[0]
    meta = golden.case(case)
    root, out = converted[case]
    reference = _generate(from_original(root, golden.root / "text_encoder"), meta)
    loaded = HARTPipeline.from_pretrained(out)
    torch.testing.assert_close(_generate(loaded, meta), reference, atol=0, rtol=0)
    loaded.save_pretrained(tmp_path / "again")
    torch.testing.assert_close(_generate(HARTPipeline.from_pretrained(tmp_path / "again"), meta), reference, atol=0, rtol=0)
    remote_code = DiffusionPipeline.from_pretrained(out, custom_pipeline=str(out), trust_remote_code=True)
    assert type(remote_code).__name__ == "HARTPipeline"
    torch.testing.assert_close(_generate(remote_code, meta), reference, atol=0, rtol=0)


def test_hub_repo_id_is_downloaded_then_loaded_locally(converted, monkeypatch):
    out = converted[CASES[0]][1]
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    pipe = HARTPipeline.from_pretrained("someone/hart-tiny", revision="main")
    assert calls == [("someone/hart-tiny", {"revision": "main"})]
    assert isinstance(pipe, HARTPipeline)


def test_push_to_hub_uploads_the_converted_folder(golden, converted, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create_repo", repo_id, exist_ok))

        def upload_folder(self, folder_path, repo_id):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in (tmp_path / "pushed").iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    root, _ = converted[CASES[0]]
    with pytest.raises(ValueError, match="--repo_id"):
        _convert(golden, root, tmp_path / "no_repo", "--push_to_hub")
    _convert(golden, root, tmp_path / "pushed", "--push_to_hub", "--repo_id", "you/hart-tiny")
    assert calls[0] == ("create_repo", "you/hart-tiny", True)
    assert calls[1][:2] == ("upload_folder", "you/hart-tiny") and {"model_index.json", "pipeline.py"} <= set(calls[1][2])


def test_no_use_ema_and_dtype(golden, converted, tmp_path):
    root, _ = converted[CASES[0]]
    out = _convert(golden, root, tmp_path / "plain_fp16", "--no_use_ema", "--dtype", "fp16")
    for component in ("transformer", "vae", "text_encoder"):
        files = list((out / component).glob("*.safetensors"))
        assert files and all(t.dtype == torch.float16 for f in files for t in load_file(str(f)).values())
    pipe = HARTPipeline.from_pretrained(out, dtype=torch.float16)
    assert pipe.transformer.dtype == torch.float16 and pipe.vae.dtype == torch.float16
    plain = load_file(str(root / "llm" / "model.safetensors"))
    torch.testing.assert_close(pipe.transformer.latent_embed.weight.float(), plain["word_embed.weight"].half().float())


def _edit_ema(root, edit):
    path = root / "llm" / "ema_model.bin"
    state = torch.load(path, weights_only=True)
    edit(state)
    path.chmod(0o644)
    torch.save(state, path)


def test_missing_key_is_named(golden, tmp_path):
    root = golden.released_layout(CASES[0], tmp_path / "released")
    _edit_ema(root, lambda s: s.pop("blocks.1.attn.q_bias"))
    with pytest.raises(CheckpointKeyError, match=r"llm/ema_model\.bin is missing .*blocks\.1\.attn\.q_bias"):
        _convert(golden, root, tmp_path / "out")


def test_unconsumed_key_is_named(golden, tmp_path):
    root = golden.released_layout(CASES[0], tmp_path / "released")
    _edit_ema(root, lambda s: s.__setitem__("mystery.weight", torch.zeros(1)))
    with pytest.raises(CheckpointKeyError, match=r"mystery\.weight"):
        _convert(golden, root, tmp_path / "out")


@pytest.mark.parametrize(
    "option, value", [("attn_type", "gpt2"), ("use_cross_attn", True), ("attn_l2_norm", True), ("brand_new_option", 1)]
)
def test_unsupported_option_is_named(golden, tmp_path, option, value):
    root = golden.released_layout(CASES[0], tmp_path / "released")
    config_path = root / "llm" / "config.json"
    config = json.loads(config_path.read_text())
    config[option] = value
    config_path.chmod(0o644)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=option):
        _convert(golden, root, tmp_path / "out")


def test_existing_output_is_never_overwritten_silently(golden, converted, tmp_path):
    root, _ = converted[CASES[0]]
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _convert(golden, root, out)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="overlaps"):
        _convert(golden, root, root / "llm" / "converted")
    _convert(golden, root, out, "--overwrite")
    assert (out / "model_index.json").is_file() and (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=oct)
def test_written_files_get_the_umask_permissions(golden, converted, tmp_path, umask):
    root, _ = converted[CASES[0]]
    previous = os.umask(umask)
    try:
        out = _convert(golden, root, tmp_path / "out")
    finally:
        os.umask(previous)
    modes = {str(path.relative_to(out)): path.stat().st_mode & 0o777 for path in out.rglob("*") if path.is_file()}
    assert "transformer/diffusion_pytorch_model.safetensors" in modes and "pipeline.py" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_help_shows_the_usage_example_line_by_line_and_every_default():
    help_lines = [line.strip() for line in build_parser().format_help().splitlines()]
    assert "hart-convert --checkpoint_path hart-0.7b-1024px \\" in help_lines
    assert "--output_path hart-0.7b-1024px-diffusers" in help_lines
    options = [action for action in build_parser()._actions if action.option_strings and action.dest != "help"]
    assert all("(default: " in action.help or "(required)" in action.help for action in options)
