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
