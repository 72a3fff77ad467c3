"""The kernel tests run the Triton kernels themselves: on a GPU, or on the CPU under the Triton
interpreter. TRITON_INTERPRET is read when a kernel is defined, so it is set here, before anything
imports ``dipc.kernels`` (CI also exports it in .ci/run)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: intra-op threads only add overhead on a 2-core CI box
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def device():
    from dipc.kernels._common import HAS_TRITON, INTERPRET

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if INTERPRET:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("dipc.kernels was imported without TRITON_INTERPRET=1 and there is no GPU")
