import os

import torch

# Triton kernels run in the interpreter on machines without a GPU; this must be set before any
# triton kernel is defined (i.e. before hyperkern.kernels is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (tiny networks: deterministic and fast); use with
    pytestmark = pytest.mark.usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def keep_threads():
    """Restores torch's thread count after a test that runs the CLI (which sets --threads)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    """Small seeded (train, val, test) slices of the embedded digits."""
    from hyperkern.data import load_digits

    d = load_digits(seed=0)
    return d.train.subset(slice(0, 200)), d.val.subset(slice(0, 80)), d.test.subset(slice(0, 80))
