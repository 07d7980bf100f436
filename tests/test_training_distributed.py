"""Data-parallel training of HARTTransformerTrainingModule, alone (a frozen text encoder's context as input) and
inside HARTTextEncoderTrainingModule (the text encoder trained too): two CPU processes (gloo) under accelerate.

Each process trains on its half of a global batch through `accelerator.prepare`d DDP. With one generator per sample
(and the mask ratio given), a sample draws the same random numbers wherever it is trained, so the two processes
together must follow a single process trained on the whole batch.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_transformer_training_step import (
    per_sample_generators,
    tiny_batch,
    tiny_text_batch,
    tiny_text_encoder_training_module,
    tiny_training_module,
)

WORLD_SIZE = 2
STEPS = 3
LEARNING_RATE = 1e-3
MASK_RATIOS = (0.7, 0.9, 0.55)
# what trains, and its batch: the transformer on a frozen encoder's context, or the text encoder with it
SETUPS = {
    "frozen_text_encoder": (tiny_training_module, tiny_batch),
    "trained_text_encoder": (tiny_text_encoder_training_module, tiny_text_batch),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample_seeds(step: int, rows: slice):
    return [1000 * step + i for i in range(4)][rows]


def _train(module, step_fn, batch, rows: slice):
    """STEPS optimizer steps on `batch[rows]`; returns the per-step losses."""
    losses = []
    for step in range(STEPS):
        inputs = [t[rows] for t in batch]
        out = module(*inputs, generator=per_sample_generators(_sample_seeds(step, rows)), mask_ratio=MASK_RATIOS[step])
        step_fn(out.loss)
        losses.append(out.loss.detach())
    return torch.stack(losses)


def _gradients(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _trained_parameters(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _rank_main(rank: int, port: int, out_dir: str, setup: str):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD_SIZE), RANK=str(rank),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD_SIZE), OMP_NUM_THREADS="1",
    )  # fmt: skip
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == WORLD_SIZE and accelerator.process_index == rank
    make_module, make_batch = SETUPS[setup]
    module, batch = make_module(), make_batch()
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=LEARNING_RATE)
    wrapped, optimizer = accelerator.prepare(module, optimizer)
    assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)

    def step_fn(loss):
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    half = len(batch[0]) // WORLD_SIZE
    rows = slice(rank * half, (rank + 1) * half)
    losses = _train(wrapped, step_fn, batch, rows)

    # One more backward through the wrapper, then the same through `wrapped.module`, which bypasses DDP's forward.
    inputs = [t[rows] for t in batch]
    seeds = _sample_seeds(STEPS, rows)
    wrapped(*inputs, generator=per_sample_generators(seeds), mask_ratio=0.8).loss.backward()
    through_wrapper = _gradients(module)
    optimizer.zero_grad()
    wrapped.module(*inputs, generator=per_sample_generators(seeds), mask_ratio=0.8).loss.backward()
    bypassing_wrapper = _gradients(module)
    state = _trained_parameters(module)
    torch.save(
        {"losses": losses, "params": state, "through_wrapper": through_wrapper, "bypassing_wrapper": bypassing_wrapper},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    accelerator.end_training()


@pytest.fixture(scope="module", params=sorted(SETUPS))
def setup(request):
    return request.param


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, setup):
    """What each of the two processes saved after training on its half of the batch."""
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_main, args=(_free_port(), str(out_dir), setup), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_process(setup):
    """The same training, in this process, on the whole batch."""
    make_module, make_batch = SETUPS[setup]
    module = make_module()
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=LEARNING_RATE)

    def step_fn(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    batch = make_batch()
    losses = _train(module, step_fn, batch, slice(None))
    module(*batch, generator=per_sample_generators(_sample_seeds(STEPS, slice(None))), mask_ratio=0.8).loss.backward()
    params = _trained_parameters(module)
    return {"losses": losses, "params": params, "gradients": _gradients(module)}


def test_processes_stay_identical(ranks, setup):
    """DDP all-reduces every gradient the step produces (the diffusion head's and a trained text encoder's too), so
    Adam moves both replicas alike: bit for bit, as both apply the same reduced gradients to the same weights."""
    first, second = ranks
    assert first["params"].keys() == second["params"].keys()
    trains_text_encoder = any(name.startswith("text_encoder.") for name in first["params"])
    assert trains_text_encoder == (setup == "trained_text_encoder")
    for name, value in first["params"].items():
        assert torch.equal(value, second["params"][name]), name
    assert not torch.equal(first["losses"], second["losses"])  # each process saw its own half


def test_two_processes_follow_one_process_on_the_whole_batch(ranks, single_process):
    """Every loss is a mean in which each sample weighs the same, so the mean of the two halves' losses is the whole
    batch's loss and DDP's average of their gradients is its gradient. What differs is float32 rounding: the sums run
    in another order (halves, then the all-reduce) and the kernels' blocking depends on the batch size, about 1e-7 of
    a value per operation. Adam divides each gradient by its running scale, which magnifies that rounding where a
    gradient is near zero: after three steps of lr 1e-3 the weights differed by at most 1.7e-5 (torch 2.13, CPU; a
    first step's near-zero gradient, as much with the text encoder trained as without), so 1e-4 is allowed, against
    the ~1e-3 per step by which a missing all-reduce moves them (each process following its own half)."""
    mean_losses = (ranks[0]["losses"] + ranks[1]["losses"]) / 2
    torch.testing.assert_close(mean_losses, single_process["losses"], rtol=1e-5, atol=1e-6)
    for name, value in single_process["params"].items():
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=0, atol=1e-4, msg=name)

    # the gradient of a step through the wrapper is the whole batch's on every process, diffusion head included
    gradients = single_process["gradients"]
    head = [n for n in gradients if ".diffusion_head." in n]
    assert head and ranks[0]["through_wrapper"].keys() == gradients.keys()
    for name, value in gradients.items():
        for rank in ranks:
            torch.testing.assert_close(rank["through_wrapper"][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_bypassing_the_wrapper_skips_the_all_reduce(ranks, single_process):
    """Calling `wrapped.module` (or the transformer's submodules from outside the wrapper) trains each process on its
    own half: the gradients differ between processes, and only their mean is the whole batch's."""
    first, second = ranks[0]["bypassing_wrapper"], ranks[1]["bypassing_wrapper"]
    differing = [n for n in first if not torch.allclose(first[n], second[n], rtol=1e-3, atol=1e-6)]
    assert len(differing) > len(first) // 2
    assert any(".diffusion_head." in n for n in differing)
    for name, value in single_process["gradients"].items():
        torch.testing.assert_close((first[name] + second[name]) / 2, value, rtol=1e-4, atol=1e-6, msg=name)
