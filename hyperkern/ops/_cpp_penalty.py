"""The "cpp" backend of hyperkern.ops.hyper_l2_penalty: torch.ops.hyperkern.hyper_l2_penalty, defined in
C++ (schema and autograd: csrc/penalty.cpp; kernels: csrc/cpu/penalty.cpp, csrc/cuda/penalty.cu).

This module adds the fake (meta) kernels of the op and of its backward op, so that both trace under
torch.compile(fullgraph=True). Arguments arrive validated by hyperkern.ops.penalty.
"""
from __future__ import annotations

import torch

from hyperkern import _C  # noqa: F401  (importing the extension registers the ops)

__all__ = ["hyper_l2_penalty"]

_ops = torch.ops.hyperkern


def _no_layers():
    return RuntimeError("hyper_l2_penalty: weights must list at least one layer")


@torch.library.register_fake("hyperkern::hyper_l2_penalty")
def _hyper_l2_penalty_fake(weights, deltas, embeddings, biases, delta_biases, stats, member_stats, kernel_cols,
                           bias_cols):
    if not weights:
        raise _no_layers()
    return weights[0].new_empty(())


@torch.library.register_fake("hyperkern::hyper_l2_penalty_backward")
def _hyper_l2_penalty_backward_fake(grad_penalty, weights, deltas, embeddings, biases, delta_biases, stats, member_stats,
                                    kernel_cols, bias_cols):
    if not weights:
        raise _no_layers()

    def like(ts):
        return [t.new_empty(t.shape) for t in ts]

    def optional_like(ts):  # an empty tensor for a layer without a bias
        return [weights[0].new_empty((0,)) if t is None else t.new_empty(t.shape) for t in ts]

    return like(weights), like(deltas), like(embeddings), optional_like(biases), optional_like(delta_biases)


# Autograd of hyperkern::hyper_l2_penalty (and of its backward op, for double backward) is registered in
# C++ (csrc/penalty.cpp).


def hyper_l2_penalty(weights, deltas, embeddings, biases, delta_biases, stats, member_stats, kernel_cols,
                     bias_cols) -> torch.Tensor:
    """Every layer's penalty in one call of the C++ op; a 0-d tensor."""
    return _ops.hyper_l2_penalty(weights, deltas, embeddings, biases, delta_biases, stats, member_stats, kernel_cols,
                                 bias_cols)
