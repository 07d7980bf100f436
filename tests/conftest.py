"""Shared test fixtures: the golden data of the original HART implementation.

The golden folder (`../shared/golden` beside the checkout, or `$HART_GOLDEN_DIR`) is read
at test time; nothing in it is copied into the tests. Tolerances come from its
`golden.json["tolerances"]["rules"]`, never from this file.
"""

import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def _import_triton_for_its_interpreter() -> None:
    """Without CUDA, import triton as its CPU interpreter wants it, so test_ops can run the kernels there.

    Triton's standard library (tl.sum, ...) is itself @triton.jit code, made interpreted or compiled when triton is
    first imported, which diffusers does at import. So TRITON_INTERPRET=1 must be set for that first import; it is
    removed again right after, so no op takes the fused path unless a test asks (test_ops sets it per test).
    """
    if torch.cuda.is_available() or "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


_import_triton_for_its_interpreter()

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("HART_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))
CASES = ("adaln", "adaln_single", "prenorm")


class Golden:
    def __init__(self, root: Path):
        self.root = root
        self.meta = json.loads((root / "golden.json").read_text())
        self.rules = [
            (re.compile(rule["pattern"]), rule["atol"], rule["rtol"]) for rule in self.meta["tolerances"]["rules"]
        ]
        self._tensors = {}

    @property
    def system_prompt(self) -> str:
        return self.meta["system_prompt"]

    def case(self, name: str) -> dict:
        return json.loads((self.root / name / "case.json").read_text())

    def tensors(self, name: str) -> dict:
        """Expected tensors of a case, or of the tokenizer when `name == "vae"`."""
        if name not in self._tensors:
            path = self.root / ("vae_expected.safetensors" if name == "vae" else f"{name}/expected.safetensors")
            self._tensors[name] = load_file(str(path))
        return self._tensors[name]

    def tolerance(self, tensor_name: str):
        for pattern, atol, rtol in self.rules:
            if pattern.fullmatch(tensor_name):
                return atol, rtol
        raise AssertionError(f"no golden tolerance rule matches {tensor_name!r}")

    def assert_close(self, tensor_name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
        """Compare by the golden rules: integer/bool exactly, floats with the first matching rule."""
        actual = actual.detach().cpu()
        assert tuple(actual.shape) == tuple(expected.shape), (
            f"{tensor_name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
        )
        if not expected.is_floating_point():
            mismatched = (actual.to(expected.dtype) != expected).sum().item()
            assert mismatched == 0, f"{tensor_name}: {mismatched} of {expected.numel()} entries differ"
            return
        atol, rtol = self.tolerance(tensor_name)
        actual = actual.to(expected.dtype)
        ok = torch.allclose(actual, expected, atol=atol, rtol=rtol)
        worst = (actual - expected).abs().max().item()
        assert ok, f"{tensor_name}: max |diff| {worst:.3e} exceeds atol={atol} rtol={rtol}"

    def released_layout(self, case: str, dest: Path) -> Path:
        """Assemble the released checkpoint layout `<dest>/{llm,tokenizer}` for a case."""
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.root / case / "llm", dest / "llm")
        shutil.copytree(self.root / "tokenizer", dest / "tokenizer")
        return dest


@pytest.fixture(scope="session")
def golden() -> Golden:
    if not (GOLDEN_DIR / "golden.json").is_file():
        pytest.fail(f"golden data not found at {GOLDEN_DIR}; set HART_GOLDEN_DIR to the shared/golden folder")
    return Golden(GOLDEN_DIR)


def run_launcher(command, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)` for a launcher of several processes
    (`torch.distributed.run`): past `timeout`, it kills the launcher's whole process group, workers included (killing
    the launcher alone left hung workers behind), and fails the test with the end of their output."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    ) as launcher:
        try:
            stdout, stderr = launcher.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            stdout, stderr = launcher.communicate()
            pytest.fail(f"{' '.join(map(str, command))} did not finish in {timeout} s; its output ended:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for the training tests: their models are tiny, and threads fighting over shared cores
    made a step 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps its state in process-wide singletons; each training run starts from none."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _interpreted_kernels(module) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    jitted = [v for v in vars(module).values() if type(v).__name__ in ("JITFunction", "InterpretedFunction")]
    return all(isinstance(v, InterpretedFunction) for v in jitted)


@pytest.fixture
def kernels(monkeypatch):
    """Make `use_fused` say yes: on CUDA as is, on the CPU under Triton's interpreter (for this test only)."""
    from diffusers_hart.ops import dispatch  # not at the top: triton's first import must see TRITON_INTERPRET

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'diffusers_hart[triton]'): the fused kernels cannot run")
    monkeypatch.delenv(dispatch.DISABLE_TRITON_ENV, raising=False)
    if not torch.cuda.is_available():
        # triton.jit reads TRITON_INTERPRET when a kernel module is imported; the kernel modules are imported
        # lazily, on the first fused call, so they come up interpreted. Should one have been imported for the GPU
        # before (it cannot on a machine without CUDA, but be sure), import it again.
        import triton.language

        if type(triton.language.standard.sum).__name__ != "InterpretedFunction":
            pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it for the "
                        "first import); run with TRITON_INTERPRET=1 in the environment")
        monkeypatch.setenv(dispatch.TRITON_INTERPRET_ENV, "1")
        for name, module in list(sys.modules.items()):
            if name.startswith("diffusers_hart.ops.kernels.") and not _interpreted_kernels(module):
                importlib.reload(module)
    assert dispatch.triton_available()
    return "cuda" if torch.cuda.is_available() else "cpu"
