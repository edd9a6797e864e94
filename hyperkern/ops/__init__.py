"""hyperkern's functional API: fused rank-1 ensemble ops (see DESIGN.md for the contract)."""
import importlib as _importlib

from hyperkern import _backends
from hyperkern.ops.conv import batch_ensemble_conv2d, hyper_batch_ensemble_conv2d
from hyperkern.ops.linear import batch_ensemble_linear, hyper_batch_ensemble_linear

# The compiled backend's op registrations (fake kernels, autograd) are imported now, so that
# dispatch inside torch.compile finds them in sys.modules. The triton backend modules import
# triton and are loaded on first use (outside torch.compile, call an op once eagerly first).
if _backends._CPP_ERROR is None:
    for _family in ("linear", "conv"):
        _importlib.import_module(f"hyperkern.ops._cpp_{_family}")

__all__ = ["batch_ensemble_linear", "hyper_batch_ensemble_linear", "batch_ensemble_conv2d",
           "hyper_batch_ensemble_conv2d"]
