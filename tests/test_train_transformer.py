"""`hart-train-transformer` end to end on CPU with a tiny pipeline (byte-level text encoder, 32 px, patch_nums
(1, 2, 4, 8)) and a few shapes images: the loss falls; a run that crashes inside a checkpoint save and resumes from
`latest` logs exactly the losses of an uninterrupted run and ends with the same weights; the text context is
encoded once per caption with the cache; the output folder loads as a HARTPipeline and generates; configs and bad
flags."""

import json
import os
import subprocess
import sys
from pathlib import Path

import accelerate.checkpointing
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from diffusers_hart.cli.train_transformer import build_parser
from diffusers_hart.cli.train_transformer import main as cli_main
from diffusers_hart.models import HARTAutoEncoder
from diffusers_hart.pipelines import HARTPipeline
from diffusers_hart.pipelines.hart.tiny import tiny_random_pipeline
from diffusers_hart.training.checkpointing import latest_checkpoint
from diffusers_hart.training.data import read_metadata
from diffusers_hart.training.shapes import write_dataset
from diffusers_hart.training.text_context import TextContextEncoder

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 5
# 5 images, one per batch, 2 accumulation steps: 3 optimizer steps per epoch, the third one a single batch. 5 steps
# cross 2 epochs; checkpoint-2 falls inside the first epoch, so resuming there skips its first 4 batches.
RUN_FLAGS = {
    "resolution": 32,
    "train_batch_size": 1,
    "gradient_accumulation_steps": 2,
    "max_train_steps": 5,
    "checkpointing_steps": 2,
    "learning_rate": 2e-3,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 2,
    "use_ema": True,
    "ema_decay": 0.9,
    "seed": 3,
    "report_to": "none",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny HARTPipeline folder (latent side 8 at 32 px: the step needs > 32 last-scale tokens) and pairs."""
    root = tmp_path_factory.mktemp("train_transformer")
    pipe = tiny_random_pipeline(patch_nums=(1, 2, 4, 8), context_length=96)
    torch.manual_seed(0)
    vae = HARTAutoEncoder(
        ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=4, vocab_size=32, patch_nums=(1, 2, 4, 8)
    ).eval()
    HARTPipeline(**{**pipe.components, "vae": vae}, system_prompt=pipe.config.system_prompt).save_pretrained(
        root / "pipe"
    )
    write_dataset(root / "data", NUM_IMAGES, 64, seed=0)
    return root


def _argv(workspace: Path, output_dir: Path, **flags) -> list:
    argv = ["--pretrained_model_name_or_path", str(workspace / "pipe"), "--train_data_dir", str(workspace / "data")]
    argv += ["--output_dir", str(output_dir)]
    for key, value in {**RUN_FLAGS, **flags}.items():
        if value is True:
            argv.append(f"--{key}")
        elif isinstance(value, list):
            argv += [f"--{key}", *value]
        elif value is not None and value is not False:
            argv += [f"--{key}", str(value)]
    return argv


def _losses(output_dir: Path) -> list:
    return [json.loads(line) for line in (output_dir / "logs" / "losses.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    """One uninterrupted run, its flags from a YAML config (with the text-context cache and a validation prompt);
    counts the captions the text encoder encodes for training."""
    output_dir = workspace / "uninterrupted"
    config = workspace / "run.yaml"
    flags = {**RUN_FLAGS, "validation_steps": 4, "validation_prompts": ["a red circle"]}
    flags.update(validation_save_pipeline=True)
    flags.update(cache_text_context=str(workspace / "cache"), train_data_dir=str(workspace / "data"))
    flags.update(pretrained_model_name_or_path=str(workspace / "pipe"), output_dir=str(output_dir))
    config.write_text(yaml.safe_dump(flags))

    encoded = []
    real_encode = HARTPipeline.encode_prompt

    def counting_encode(self, prompt, *args, **kwargs):
        if not kwargs.get("do_classifier_free_guidance", True):  # the trainer's calls, not validation's
            encoded.extend([prompt] if isinstance(prompt, str) else prompt)
        return real_encode(self, prompt, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HARTPipeline, "encode_prompt", counting_encode)
        assert cli_main(["--config", str(config)]) == 0
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return output_dir, encoded


def test_training_lowers_the_loss(uninterrupted):
    output_dir, _ = uninterrupted
    losses = _losses(output_dir)
    assert [record["step"] for record in losses] == list(range(1, 6))
    assert {"loss", "token_loss", "diffusion_loss", "token_accuracy", "lr"} <= set(losses[0])
    assert losses[0]["lr"] < losses[1]["lr"]  # warmup, then cosine decay
    first, last = losses[0], losses[-1]
    assert last["token_loss"] < 0.8 * first["token_loss"] and last["token_accuracy"] >= first["token_accuracy"]
    assert last["loss"] < first["loss"]


def test_text_context_is_encoded_once_per_caption_with_the_cache(uninterrupted, workspace):
    _, encoded = uninterrupted
    captions = [json.loads(line)["text"] for line in (workspace / "data" / "metadata.jsonl").read_text().splitlines()]
    # 2 epochs of 5 captions, each encoded once; the rest came from the cache
    assert sorted(encoded) == sorted(captions)
    assert len(list((workspace / "cache").rglob("*.safetensors"))) == len(set(captions))


def test_text_context_cache_returns_the_encoder_output_and_follows_the_encoder(tmp_path):
    pipe = tiny_random_pipeline(context_length=16)
    captions = ["a cat", "a dog", "a cat"]
    fresh = TextContextEncoder(pipe, "cpu")(captions)
    cached = TextContextEncoder(pipe, "cpu", cache_dir=tmp_path)
    first, again = cached(captions), cached(captions)
    assert (cached.num_encoded, cached.num_cached) == (2, 4)  # distinct captions once; the rest from disk
    for result in (first, again):
        assert torch.equal(result[0], fresh[0]) and torch.equal(result[1], fresh[1])
    # another system prompt (or encoder, or context length) is another cache folder, never stale context
    pipe.register_to_config(system_prompt="Draw this: ")
    other = TextContextEncoder(pipe, "cpu", cache_dir=tmp_path)
    other(["a cat"])
    assert other.num_encoded == 1 and other.cache_dir != cached.cache_dir


def test_validation_images_are_saved_with_their_prompts(uninterrupted):
    output_dir, _ = uninterrupted
    for step in (4, 5):  # every 4 steps, and at the end
        folder = output_dir / "validation" / f"step-{step}"
        assert (folder / "00.png").is_file()
        assert read_metadata(folder) == [("00.png", "a red circle")]  # an imagefolder, for hart-eval-shapes


def test_validation_saves_the_model_it_validated(uninterrupted):
    output_dir, _ = uninterrupted

    def transformer_weights(folder):
        return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")

    final = transformer_weights(output_dir)
    at_end, at_step_4 = (transformer_weights(output_dir / "validation" / f"step-{s}" / "pipeline") for s in (5, 4))
    assert all(torch.equal(at_end[name], final[name]) for name in final)  # the EMA weights, as the final save
    assert not all(torch.equal(at_step_4[name], final[name]) for name in final)
    HARTPipeline.from_pretrained(output_dir / "validation" / "step-4" / "pipeline")


def test_output_loads_as_a_pipeline_and_generates(uninterrupted):
    output_dir, _ = uninterrupted
    pipe = HARTPipeline.from_pretrained(output_dir)
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0), guidance_scale=1.0).images[0]
    assert image.size == (32, 32)


def test_crash_in_checkpoint_save_then_resume_latest_matches_uninterrupted(uninterrupted, workspace, monkeypatch):
    reference_dir, _ = uninterrupted
    output_dir = workspace / "crashed"
    argv = _argv(workspace, output_dir, cache_text_context=str(workspace / "cache"))

    # 1. the save of checkpoint-4 dies after its first file: checkpoint-2 stays the latest complete one
    real_save = accelerate.checkpointing.save

    def crash_in_second_save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if ".checkpoint-4.partial" in str(path):
            raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(accelerate.checkpointing, "save", crash_in_second_save)
    with pytest.raises(KeyboardInterrupt):
        cli_main(argv)
    monkeypatch.undo()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert latest_checkpoint(output_dir) == output_dir / "checkpoint-2"
    assert not (output_dir / "checkpoint-4").exists() and (output_dir / ".checkpoint-4.partial").exists()
    assert [record["step"] for record in _losses(output_dir)] == list(range(1, 5))

    # 2. the same command with --resume_from_checkpoint latest repeats steps 3-4 and finishes: identical logs
    assert cli_main(argv + ["--resume_from_checkpoint", "latest"]) == 0
    assert _losses(output_dir) == _losses(reference_dir)
    reference = load_file(reference_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(output_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)  # EMA weights, saved at the end


def test_lora_trains_and_saves_only_the_adapter(workspace, tmp_path):
    pytest.importorskip("peft")
    output_dir = tmp_path / "lora"
    argv = _argv(workspace, output_dir, lora_rank=4, max_train_steps=2, use_ema=False)
    assert cli_main(argv) == 0
    assert not (output_dir / "transformer").exists()  # the adapter alone, not the pipeline
    adapter = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert adapter and all("lora" in key for key in adapter)
    assert any(value.abs().sum() > 0 for key, value in adapter.items() if "lora_B" in key)  # B starts at zero
    pipe = HARTPipeline.from_pretrained(workspace / "pipe")
    pipe.transformer.load_lora_adapter(output_dir, prefix=None, use_safetensors=True)
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0), guidance_scale=1.0).images[0]
    assert image.size == (32, 32)


def test_text_encoder_trains_with_the_transformer_and_saves_with_the_pipeline(workspace, tmp_path):
    output_dir = tmp_path / "joint"
    argv = _argv(workspace, output_dir, train_text_encoder=True, text_encoder_learning_rate=5e-3, max_train_steps=3)
    assert cli_main(argv) == 0
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    losses = _losses(output_dir)
    assert len(losses) == 3 and all(record["loss"] == record["loss"] for record in losses)  # finite, no NaN
    start = HARTPipeline.from_pretrained(workspace / "pipe")
    trained = HARTPipeline.from_pretrained(output_dir)
    start_weights, trained_weights = start.text_encoder.state_dict(), trained.text_encoder.state_dict()
    assert trained_weights.keys() == start_weights.keys()
    changed = [name for name in start_weights if not torch.equal(start_weights[name], trained_weights[name])]
    assert len(changed) == len(start_weights)  # every weight trained, and saved with the pipeline
    # EMA follows the text encoder too: its checkpointed shadow holds the transformer's and the encoder's weights
    ema_state = torch.load(
        latest_checkpoint(output_dir) / "custom_checkpoint_0.pkl", weights_only=False
    )
    num_trained = len(list(start.transformer.parameters())) + len(list(start.text_encoder.parameters()))
    assert len(ema_state["shadow_params"]) == num_trained
    image = trained("a red circle", generator=torch.Generator().manual_seed(0), guidance_scale=1.0).images[0]
    assert image.size == (32, 32)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"train_text_encoder": True, "cache_text_context": "CACHE"}, "it cannot be cached: drop --cache_text_context"),
        ({"train_text_encoder": True, "lora_rank": 4}, "it does not combine with --lora_rank"),
        ({"text_encoder_learning_rate": 1e-4}, "--text_encoder_learning_rate needs --train_text_encoder"),
    ],
)
def test_text_encoder_training_refuses_what_it_cannot_combine_with(flags, message, workspace, tmp_path, capsys):
    flags = {key: str(tmp_path / "cache") if value == "CACHE" else value for key, value in flags.items()}
    with pytest.raises(SystemExit) as exit_info:
        cli_main(_argv(workspace, tmp_path / "out", **flags))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("hart-train-transformer: error:") and len(error.strip().splitlines()) == 1
    assert message in error
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_fresh_start_refuses_an_output_dir_with_checkpoints(uninterrupted, workspace, capsys):
    output_dir, _ = uninterrupted
    with pytest.raises(SystemExit) as exit_info:
        cli_main(_argv(workspace, output_dir))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("hart-train-transformer: error:") and len(error.strip().splitlines()) == 1
    assert "pass --resume_from_checkpoint latest" in error


def test_config_files_fill_flags_and_the_command_line_overrides_them(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"learning_rate": 3e-4, "--use_ema": True, "validation_prompts": ["a", "b c"]}))
    args = build_parser().parse_args(["--config", str(config), "--learning_rate", "5e-5"])
    assert (args.learning_rate, args.use_ema, args.validation_prompts) == (5e-5, True, ["a", "b c"])
    yaml_config = tmp_path / "config.yaml"
    yaml_config.write_text("train_batch_size: 4\nmixed_precision: bf16\n")
    args = build_parser().parse_args(["--config", str(yaml_config)])
    assert (args.train_batch_size, args.mixed_precision, args.learning_rate) == (4, "bf16", 1e-4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mixed_precision", "fp8"], "argument --mixed_precision: invalid choice"),
        (["--train_batch_size", "0"], "must be a whole number of at least 1"),
        (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
        (["--config", "CONFIG"], "unknown flag 'learning_rat'"),
    ],
)
def test_bad_flags_give_one_line_errors(argv, message, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rat: 1e-4\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main([str(config) if a == "CONFIG" else a for a in argv])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and error.startswith("hart-train-transformer: error:")
    assert message in error


def test_missing_model_and_missing_peft_are_one_line_errors(workspace, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        cli_main(["--train_data_dir", str(workspace / "data"), "--output_dir", str(tmp_path / "out")])
    assert "pass exactly one of --pretrained_model_name_or_path" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(SystemExit):
        cli_main(_argv(workspace, tmp_path / "lora", lora_rank=4))
    error = capsys.readouterr().err
    assert error.startswith("hart-train-transformer: error:") and len(error.strip().splitlines()) == 1
    assert "--lora_rank needs the peft package" in error


def test_python_dash_m_runs_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_hart.cli.train_transformer", "--learning_rate", "fast"],
        cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "hart-train-transformer: error: argument --learning_rate: invalid float value: 'fast'"
    ]
