"""torch.compile(fullgraph=True) traces the zoo models without graph breaks (tiny inputs; the "eager"
compiler backend keeps it fast: fullgraph=True raises on any graph break whatever the backend)."""
import pytest
import torch

import hyperkern.models as M
import hyperkern.nn as hnn


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", ["batch", "hyper_batch"])
def test_resnet20_compiles_without_graph_breaks(variant):
    E, B = 2, 2
    model = M.resnet20(10, variant=variant, ensemble_size=E, depth=8, width=4, backend="torch").eval()
    x = hnn.tile(torch.randn(B, 3, 8, 8), E)
    args = (x,) if variant == "batch" else (x, torch.rand(E * B, model.num_hparams))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), model(*args))
    explanation = torch._dynamo.explain(model)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_hyper_mlp_with_per_row_dropout_compiles_in_training_mode():
    E, B = 2, 3
    model = M.mlp(4, in_features=6, hidden_features=(8,), variant="hyper_batch", ensemble_size=E, backend="torch")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    dist = hnn.EnsembleLogUniform(model.hparam_space, E)
    lam = dist.rsample(B)
    out = compiled(torch.randn(E * B, 6), model.hparam_space.normalize(lam))
    (out.square().mean() + model.l2_penalty(lam)).backward()
    assert out.shape == (E * B, 4) and dist.log_low.grad is not None
