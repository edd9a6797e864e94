"""convert_ with num_hparams on containers that pass only x (nn.Sequential): the model takes
hparams= and hands them to every hyper-batch layer; and ensemble_proba, the ensemble's prediction from
member-major logits."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

import hyperkern.nn as hnn

F64 = torch.float64


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 8), nn.Tanh()),
                         nn.Linear(8, 3))


def _by_hand(model, x, h):
    """The converted Sequential evaluated layer by layer, hparams passed explicitly."""
    def run(seq, x):
        for m in seq:
            if isinstance(m, nn.Sequential):
                x = run(m, x)
            elif isinstance(m, (hnn.HyperBatchEnsembleLinear, hnn.HyperBatchEnsembleConv2d)):
                x = m(x, h)
            else:
                x = m(x)
        return x
    return run(model, x)


def test_a_converted_sequential_takes_hparams_and_threads_them_to_every_hyper_layer():
    torch.manual_seed(0)
    E, B = 4, 5
    model = hnn.convert_(_mlp().double(), ensemble_size=E, num_hparams=2, backend="torch")
    assert sum(isinstance(m, hnn.HyperBatchEnsembleLinear) for m in model.modules()) == 3
    for m in model.modules():  # give the embeddings weight, so a missing hparams would show
        if isinstance(m, hnn.HyperBatchEnsembleLinear):
            with torch.no_grad():
                m.embedding.weight.normal_()
    x = hnn.tile(torch.randn(B, 3, 4, dtype=F64), E)
    h = torch.rand(E * B, 2, dtype=F64)
    out = model(x, hparams=h)
    assert out.shape == (E * B, 3)
    torch.testing.assert_close(out, _by_hand(model, x, h))
    other = model(x, hparams=torch.rand(E * B, 2, dtype=F64))
    assert not torch.allclose(out, other)  # the hparams matter
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_converted_model_called_without_hparams_says_how_to_call_it():
    model = hnn.convert_(_mlp(), ensemble_size=2, num_hparams=2)
    with pytest.raises(TypeError, match=r"hparams="):
        model(torch.randn(4, 12))
    # the hparams of one call do not leak into the next
    model(torch.randn(4, 12), hparams=torch.rand(4, 2))
    with pytest.raises(TypeError, match=r"hparams="):
        model(torch.randn(4, 12))


def test_hparams_are_checked_at_the_layers():
    model = hnn.convert_(_mlp(), ensemble_size=2, num_hparams=2)
    with pytest.raises(ValueError, match="hparams"):
        model(torch.randn(4, 12), hparams=torch.rand(4, 3))


def test_a_model_that_threads_hparams_itself_is_left_alone():
    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 2)

        def forward(self, x, hparams):
            return self.b(self.a(x, hparams).relu(), hparams)

    model = hnn.convert_(Own(), ensemble_size=2, num_hparams=1)
    x, h = torch.randn(6, 6), torch.rand(6, 1)
    torch.testing.assert_close(model(x, h), model.b(model.a(x, h).relu(), h))


def test_a_converted_model_copies_and_round_trips_through_torch_save():
    torch.manual_seed(0)
    model = hnn.convert_(_mlp(), ensemble_size=2, num_hparams=2)
    x, h = torch.randn(4, 12), torch.rand(4, 2)
    want = model(x, hparams=h)
    torch.testing.assert_close(copy.deepcopy(model)(x, hparams=h), want)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x, hparams=h), want)
    fresh = hnn.convert_(_mlp(), ensemble_size=2, num_hparams=2)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x, hparams=h), want)


def test_converting_twice_does_not_stack_hooks():
    model = hnn.convert_(_mlp(), ensemble_size=2, num_hparams=2)
    hooks = len(model._forward_pre_hooks)
    hnn.convert_(model, ensemble_size=2, num_hparams=2)
    assert len(model._forward_pre_hooks) == hooks


def test_a_batch_conversion_needs_no_hparams():
    model = hnn.convert_(_mlp(), ensemble_size=2)
    assert model(torch.randn(4, 12)).shape == (4, 3)
    assert len(model._forward_pre_hooks) == 0


def test_ensemble_proba_is_the_mean_of_the_members_probabilities():
    torch.manual_seed(0)
    E, B, C = 3, 4, 5
    logits = torch.randn(E * B, C, dtype=F64)
    p = hnn.ensemble_proba(logits, E)
    assert p.shape == (B, C)
    want = sum(logits[k * B:(k + 1) * B].softmax(-1) for k in range(E)) / E
    torch.testing.assert_close(p, want)
    torch.testing.assert_close(p.sum(-1), torch.ones(B, dtype=F64))
    half = hnn.ensemble_proba(logits.to(torch.bfloat16), E)
    assert half.dtype == torch.float32  # low precision is averaged in float32
    with pytest.raises(ValueError, match="divisible"):
        hnn.ensemble_proba(torch.randn(7, C), E)


def test_ensemble_proba_of_a_converted_model_end_to_end():
    torch.manual_seed(0)
    E = 4
    model = hnn.convert_(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), ensemble_size=E)
    x = torch.randn(5, 6)
    p = hnn.ensemble_proba(model(hnn.tile(x, E)), E)
    assert p.shape == (5, 3)
    torch.testing.assert_close(p.sum(-1), torch.ones(5))
