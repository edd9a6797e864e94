"""hyperkern's functional API: fused rank-1 ensemble ops (see DESIGN.md for the contract)."""
from hyperkern.ops.conv import batch_ensemble_conv2d, hyper_batch_ensemble_conv2d
from hyperkern.ops.linear import batch_ensemble_linear, hyper_batch_ensemble_linear

__all__ = ["batch_ensemble_linear", "hyper_batch_ensemble_linear", "batch_ensemble_conv2d",
           "hyper_batch_ensemble_conv2d"]
