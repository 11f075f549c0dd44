"""Session-wide test settings.

Tests run single-threaded.  On the 2-core CI/dev machines, PyTorch's OpenMP/MKL
elementwise kernels with 2 threads are pathologically slow under load: ``torch.log`` on
~1e5 float64 elements takes ~8 ms with 2 threads vs ~0.15 ms with 1, and calling
``torch.set_num_threads(2)`` at runtime (e.g. to restore a saved count) makes even small
``torch.log`` calls ~1000x slower for the rest of the process.  The Brownian tree uses
``log`` (Box-Muller), so this turns a 2-minute suite into 12+ minutes.  Setting one thread
here also makes tests that save/restore the thread count restore 1, never 2.
"""

import pytest
import torch

torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-long",
        action="store_true",
        default=False,
        help="tests/test_fuzz.py: ~10^4 generated cases (default: a few hundred, derandomized)",
    )


@pytest.fixture
def float64_default():
    """float64 as the default dtype for one test (``pytestmark = pytest.mark.usefixtures("float64_default")``),
    restored afterwards so other modules' float32 tests are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(params=["fused", "eager"])
def tree_kernel(request, monkeypatch):
    """Both paths of the Brownian tree's ``evaluate`` (``pytestmark = pytest.mark.usefixtures("tree_kernel")``):
    the fused C kernel (skipped without a C compiler) and the eager torch ops."""
    from diffeqbridge import _tree_kernel

    if request.param == "fused" and _tree_kernel.c_kernel() is None:
        pytest.skip("no C compiler: the fused CPU kernel is unavailable")
    monkeypatch.setenv("DIFFEQBRIDGE_TREE_KERNEL", request.param)
    return request.param
