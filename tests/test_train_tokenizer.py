"""`hart-train-tokenizer` on CPU with a tiny HARTAutoEncoder (16 px, patch_nums (1, 2, 4)) and a few shapes images:
the losses fall, held-out PSNR is reported, the discriminator starts at its step; and the training module's pieces
(both decodes with straight-through gradients, frozen discriminator in the generator step, PSNR)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import run_launcher

from diffusers_hart.cli.train_tokenizer import main as cli_main
from diffusers_hart.models import HARTAutoEncoder
from diffusers_hart.training.checkpointing import complete_checkpoints
from diffusers_hart.training.shapes import write_dataset
from diffusers_hart.training.tokenizer_step import (
    HARTTokenizerTrainingModule,
    PatchGANDiscriminator,
    frozen,
    psnr,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
VAE_CONFIG = dict(ch=32, ch_mult=[1, 1, 1], num_res_blocks=1, z_channels=4, vocab_size=32, patch_nums=[1, 2, 4])
STEPS, DISCRIMINATOR_START = 8, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerate_state")


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_tokenizer")
    write_dataset(root / "data", 10, 64, seed=0)
    (root / "vae.json").write_text(json.dumps(VAE_CONFIG))
    output_dir = root / "out"
    argv = ["--vae_config", str(root / "vae.json"), "--train_data_dir", str(root / "data"), "--output_dir",
            str(output_dir), "--resolution", "16", "--train_batch_size", "4", "--max_train_steps", str(STEPS),
            "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--checkpointing_steps", "4",
            "--validation_steps", "4", "--num_validation_images", "2", "--report_to", "none",
            "--discriminator_start_step", str(DISCRIMINATOR_START), "--discriminator_channels", "16",
            "--discriminator_layers", "2"]  # fmt: skip
    assert cli_main(argv) == 0
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return output_dir


def test_training_lowers_the_reconstruction_losses(run):
    losses = _read_jsonl(run / "logs" / "losses.jsonl")
    assert [record["step"] for record in losses] == list(range(1, STEPS + 1))
    for key in ("reconstruction_loss", "discrete_reconstruction_loss"):
        assert losses[-1][key] < 0.8 * losses[0][key], key


def test_held_out_psnr_is_reported_and_rises(run):
    validation = _read_jsonl(run / "logs" / "validation.jsonl")
    assert [record["step"] for record in validation] == [4, 8]
    assert all(record["psnr"] > 0 and record["psnr_discrete"] > 0 for record in validation)
    assert validation[-1]["psnr"] > validation[0]["psnr"]
    assert (run / "validation" / "step-8" / "reconstructions.png").is_file()


def test_discriminator_switches_on_at_its_start_step(run):
    for record in _read_jsonl(run / "logs" / "losses.jsonl"):
        started = record["step"] > DISCRIMINATOR_START  # step N is logged after global step N - 1 ran
        assert ("discriminator_loss" in record) == started
        assert (record["generator_adversarial_loss"] != 0) == started
    # the discriminator's optimizer had taken no step by checkpoint-4, and had by checkpoint-8
    before = torch.load(run / "checkpoint-4" / "optimizer_1.bin", weights_only=False)
    after = torch.load(run / "checkpoint-8" / "optimizer_1.bin", weights_only=False)
    assert before["state"] == {} and after["state"] != {}


def test_output_is_a_tokenizer_folder(run):
    vae = HARTAutoEncoder.from_pretrained(run)
    assert tuple(vae.config.patch_nums) == (1, 2, 4)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    assert vae.decode(vae.encode(image).latent).sample.shape == image.shape


def test_two_processes_with_ddp_train_and_checkpoint(tmp_path):
    """Two CPU processes (gloo): DDP needs a gradient for every trainable parameter (the quantizer's unused `Phi`
    conv is frozen) and the discriminator trains beside it; each process saves its own RNG state."""
    write_dataset(tmp_path / "data", 6, 64, seed=0)
    (tmp_path / "vae.json").write_text(json.dumps(VAE_CONFIG))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "diffusers_hart.cli.train_tokenizer", "--debug", "--vae_config", str(tmp_path / "vae.json"),
               "--train_data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--resolution", "16",
               "--train_batch_size", "2", "--max_train_steps", "3", "--checkpointing_steps", "3", "--report_to", "none",
               "--discriminator_start_step", "1", "--discriminator_channels", "8",
               "--discriminator_layers", "2"]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = run_launcher(command, timeout=300, cwd=REPO_ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert "discriminator_loss" in _read_jsonl(tmp_path / "out" / "logs" / "losses.jsonl")[-1]


def _tiny_vae():
    torch.manual_seed(0)
    return HARTAutoEncoder(**VAE_CONFIG)


def _gradients(**weights):
    """Gradients of the encoder's first conv and of the codebook after one step on fixed images."""
    vae = _tiny_vae()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = HARTTokenizerTrainingModule(vae, **weights)(images)
    out.loss.backward()
    assert out.reconstructions.shape == (4, 3, 16, 16)  # continuous and discrete decodes
    codebook = vae.quantize.embedding.weight.grad
    return vae.encoder.conv_in.weight.grad, torch.zeros(1) if codebook is None else codebook


def test_both_decodes_train_the_encoder_and_vq_trains_the_codebook():
    encoder_both, codebook_no_vq = _gradients(vq_weight=0.0)
    encoder_continuous, _ = _gradients(vq_weight=0.0, discrete_weight=0.0)
    # the discrete decode's gradient reaches the encoder through the straight-through f_hat
    assert not torch.allclose(encoder_both, encoder_continuous)
    # reconstruction does not move the codebook; the VQ loss does
    assert not codebook_no_vq.any()
    _, codebook = _gradients(discrete_weight=0.0)
    assert codebook.abs().sum() > 0


def test_generator_step_leaves_the_discriminator_untrained():
    vae, discriminator = _tiny_vae(), PatchGANDiscriminator(base_channels=8, num_layers=2)
    module = HARTTokenizerTrainingModule(vae, adversarial_weight=1.0)
    with frozen(discriminator):
        out = module(torch.rand(2, 3, 16, 16) * 2 - 1, discriminator=discriminator)
    out.loss.backward()
    assert out.generator_adversarial_loss != 0
    assert all(p.grad is None and p.requires_grad for p in discriminator.parameters())
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_datasets_and_plain_image_folders_are_training_sets(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from PIL import Image

    from diffusers_hart.training.trainer import build_train_dataset

    for i in range(3):  # no metadata.jsonl: the tokenizer needs no captions
        Image.new("RGB", (20, 24), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
    args = SimpleNamespace(train_data_dir=str(tmp_path), dataset_name=None, resolution=16, on_bad_image="error",
                           random_crop=False, random_flip=False)  # fmt: skip
    images = build_train_dataset(args, captions_required=False)
    assert len(images) == 3 and images[2]["pixel_values"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="metadata.jsonl"):
        build_train_dataset(args, captions_required=True)

    rows = [{"picture": tmp_path / "1.png", "caption": "red"}]
    fake_datasets = SimpleNamespace(load_dataset=lambda name, config, cache_dir: {"train": rows})
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets)
    dataset_flags = {"train_data_dir": None, "dataset_name": "me/pairs", "dataset_config_name": None,
                     "cache_dir": None, "image_column": "picture", "caption_column": "caption"}  # fmt: skip
    args = SimpleNamespace(**{**vars(args), **dataset_flags})
    pairs = build_train_dataset(args)
    assert len(pairs) == 1 and pairs[0]["text"] == "red"


def test_psnr():
    images = torch.zeros(2, 3, 4, 4)
    assert torch.isinf(psnr(images, images)).all()
    # 0.2 apart in [-1, 1] is 0.1 in [0, 1]: MSE 0.01, 20 dB
    assert torch.allclose(psnr(images + 0.2, images), torch.tensor([20.0, 20.0]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pretrained_vae_path", "somewhere"], "pass exactly one of --pretrained_vae_path"),
        (["--resolution", "48"], "pass --resolution 16"),
        (["--discriminator_start_step", "0"], "too small for 3 discriminator layers"),
    ],
)
def test_bad_setups_give_one_line_errors(extra, message, tmp_path, capsys):
    (tmp_path / "vae.json").write_text(json.dumps(VAE_CONFIG))
    write_dataset(tmp_path / "data", 2, 64, seed=0)
    argv = ["--vae_config", str(tmp_path / "vae.json"), "--train_data_dir", str(tmp_path / "data"),
            "--output_dir", str(tmp_path / "out"), "--resolution", "16", *extra]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("hart-train-tokenizer: error:") and len(error.strip().splitlines()) == 1
    assert message in error


def test_max_train_seconds_stops_early_and_still_saves(tmp_path, monkeypatch):
    """With a time limit already used up after the first step, training stops there and saves the tokenizer."""
    import diffusers_hart.training.trainer as trainer_module

    write_dataset(tmp_path / "data", 8, 64, seed=0)
    (tmp_path / "vae.json").write_text(json.dumps(VAE_CONFIG))
    clock = iter(range(0, 10_000, 100))  # every reading of the clock is 100 s after the previous one
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: next(clock))
    argv = ["--vae_config", str(tmp_path / "vae.json"), "--train_data_dir", str(tmp_path / "data"), "--output_dir",
            str(tmp_path / "out"), "--resolution", "16", "--train_batch_size", "4", "--max_train_steps", "6",
            "--max_train_seconds", "150", "--checkpointing_steps", "100", "--report_to", "none"]  # fmt: skip
    assert cli_main(argv) == 0
    steps = [record["step"] for record in _read_jsonl(tmp_path / "out" / "logs" / "losses.jsonl")]
    # the deadline (150 s) is past when step 2's record is made (200 s), and that record is read after step 3 (a step
    # record is read one step late, so that the host queues the next step while the device runs this one)
    assert steps == [1, 2, 3]
    summary = json.loads((tmp_path / "out" / "logs" / "run_summary.json").read_text())
    assert (summary["global_step"], summary["timed_steps"], summary["images_per_step"]) == (3, 2, 4)
    assert summary["images_per_second"] == pytest.approx(2 * 4 / summary["timed_seconds"])
    assert HARTAutoEncoder.from_pretrained(tmp_path / "out").config.vocab_size == VAE_CONFIG["vocab_size"]
    # the stop also checkpoints, so a time-boxed run (a 10-minute device call) continues where it stopped
    assert [step for step, _ in complete_checkpoints(tmp_path / "out")] == [3]
    clock = iter(range(0, 10_000, 100))
    assert cli_main([*argv, "--resume_from_checkpoint", "latest"]) == 0
    steps = [record["step"] for record in _read_jsonl(tmp_path / "out" / "logs" / "losses.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in complete_checkpoints(tmp_path / "out")] == [3, 6]
