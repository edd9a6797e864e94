"""hyperkern.nn: rank-1 ensemble layers and their helpers.

Rows are member-major everywhere: a batch of E*B rows where rows k*B .. (k+1)*B-1 belong to
ensemble member k. tile(x, E) builds such a batch from one minibatch; untile(y, E) splits it;
ensemble_proba(logits, E) is the ensemble's prediction (the mean of the members' probabilities).
"""
from hyperkern.nn.convert import convert_, from_conv2d, from_linear
from hyperkern.nn.functional import ensemble_proba, relu_rowwise_dropout, rowwise_dropout, tile, untile
from hyperkern.nn.hparams import EnsembleLogUniform, HyperParameter, HyperParameterSpace
from hyperkern.nn.layers import (BatchEnsembleConv2d, BatchEnsembleLinear, HyperBatchEnsembleConv2d,
                                 HyperBatchEnsembleLinear, check_hparams)
from hyperkern.nn.loaders import (load_edward2_, load_tabm_, load_torch_uncertainty_, member_major_to_tabm,
                                  tabm_to_member_major)
from hyperkern.nn.norm import EnsembleBatchNorm2d

__all__ = [
    "BatchEnsembleLinear", "BatchEnsembleConv2d", "HyperBatchEnsembleLinear", "HyperBatchEnsembleConv2d",
    "EnsembleBatchNorm2d", "HyperParameter", "HyperParameterSpace", "EnsembleLogUniform",
    "tile", "untile", "ensemble_proba", "rowwise_dropout", "relu_rowwise_dropout", "check_hparams", "from_linear", "from_conv2d", "convert_",
    "load_tabm_", "load_torch_uncertainty_", "load_edward2_", "tabm_to_member_major", "member_major_to_tabm",
    "fast_parameters", "slow_parameters",
]


def fast_parameters(module):
    """The fast weights (r, s, u, v) of every rank-1 layer inside module, each once."""
    seen = set()
    for m in module.modules():
        if isinstance(m, (BatchEnsembleLinear, BatchEnsembleConv2d)):
            for p in m.fast_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p


def slow_parameters(module):
    """Every parameter of module that is not a fast weight, each once."""
    fast = {id(p) for p in fast_parameters(module)}
    for p in module.parameters():
        if id(p) not in fast:
            yield p
