"""hyperkern.models: the paper's zoo (MLP, LeNet-5, ResNet-20, Wide ResNet 28-10), each in three variants.

    model = hyperkern.models.wrn28_10(num_classes=10, variant="hyper_batch", ensemble_size=4)
    logits = model(tile(x, 4), hparams)        # (E*B, classes), member-major

variant="plain" (one network), "batch" (BatchEnsemble) or "hyper_batch" (forward(x, hparams) with
hparams (E*B, model.num_hparams) in [0, 1]). Rows are member-major: rows k*B .. (k+1)*B-1 belong to
member k. See hyperkern.models._base for the L2 / fast-weight interface trainers use.
"""
from hyperkern.models._base import VARIANTS, EnsembleModel
from hyperkern.models.lenet import LeNet5, lenet5
from hyperkern.models.mlp import MLP, mlp
from hyperkern.models.resnet import ResNet20, WideResNet, resnet20, wrn28_10

__all__ = ["VARIANTS", "EnsembleModel", "MLP", "LeNet5", "ResNet20", "WideResNet", "mlp", "lenet5", "resnet20",
           "wrn28_10"]
