"""hyperkern: deep, batch, hyper-deep and hyper-batch ensembles for PyTorch, on fused rank-1 kernels.

Rows are member-major everywhere: a batch of E*B rows where rows k*B .. (k+1)*B-1 belong to
ensemble member k.
"""
from hyperkern._backends import available_backends, backend_status
from hyperkern import ops

__version__ = "0.1.0"

__all__ = ["available_backends", "backend_status", "ops", "__version__"]


def __getattr__(name):  # lazy subpackages: importing hyperkern stays light
    import importlib

    if name in ("nn", "models", "ensembles", "metrics", "data"):
        return importlib.import_module(f"hyperkern.{name}")
    raise AttributeError(f"module 'hyperkern' has no attribute {name!r}")
