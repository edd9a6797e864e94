"""hyperkern's functional API: fused rank-1 ensemble ops (see docs/design.md for the contract)."""
import importlib as _importlib

from hyperkern import _backends
from hyperkern.ops.conv import batch_ensemble_conv2d, hyper_batch_ensemble_conv2d, hyper_batch_ensemble_conv2d_hp
from hyperkern.ops.linear import batch_ensemble_linear, hyper_batch_ensemble_linear, hyper_batch_ensemble_linear_hp
from hyperkern.ops.penalty import PenaltyStats, hyper_l2_penalty, penalty_stats

# The fused backends' op registrations (fake kernels, autograd) are imported now, so that dispatch
# inside torch.compile finds them in sys.modules. Triton's are imported only where triton can run
# (a visible GPU, or its interpreter), keeping `import hyperkern` light elsewhere.
_triton_usable = any(_backends._triton_reason(device) is None for device in ("cuda", "cpu"))
_ready = (["cpp"] if _backends._CPP_ERROR is None else []) + (["triton"] if _triton_usable else [])
for _backend in _ready:
    for _family in ("linear", "conv"):
        _importlib.import_module(f"hyperkern.ops._{_backend}_{_family}")
# The penalty has a cpp backend only, in builds of the extension that define it
if ("hyper_l2_penalty", "CPU") in _backends._CPP_KERNELS or ("hyper_l2_penalty", "CUDA") in _backends._CPP_KERNELS:
    _importlib.import_module("hyperkern.ops._cpp_penalty")

__all__ = ["batch_ensemble_linear", "hyper_batch_ensemble_linear", "hyper_batch_ensemble_linear_hp", "batch_ensemble_conv2d",
           "hyper_batch_ensemble_conv2d", "hyper_batch_ensemble_conv2d_hp", "hyper_l2_penalty", "penalty_stats",
           "PenaltyStats"]
