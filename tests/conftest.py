import pytest
import torch

# oneDNN compiles a kernel the first time it meets each convolution shape (seconds per shape on
# these CPUs); the tests build many small models once each, so the native kernels are faster here.
torch.backends.mkldnn.enabled = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
