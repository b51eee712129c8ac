import pytest
import torch
from hypothesis import settings

from deq_core import list_solvers, unregister_solver

# oneDNN compiles a kernel the first time it meets each convolution shape (seconds per shape on
# these CPUs); the tests build many small models once each, so the native kernels are faster here.
torch.backends.mkldnn.enabled = False


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device of the tests that take the `device` fixture (the solver and layer-gradient "
                          "tests): cpu (default), cuda or cuda:N")


def pytest_configure(config):
    name = config.getoption("--device")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {name} was given but CUDA is not available to torch {torch.__version__}")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device named by ``--device``."""
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="module")
def _solver_registry():
    """Solvers a test module registers are gone after it, so no module sees another's."""
    before = set(list_solvers())
    yield
    for name in set(list_solvers()) - before:
        unregister_solver(name)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module whose runs start other processes or build many tiny graphs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Property tests (hypothesis) are derandomized: the same examples on every run and machine. A
# larger budget: pytest --hypothesis-profile=thorough.
settings.register_profile("default", derandomize=True, deadline=None, max_examples=60, print_blob=True)
settings.register_profile("thorough", derandomize=True, deadline=None, max_examples=1200, print_blob=True)
settings.load_profile("default")
