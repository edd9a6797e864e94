"""The ops' argument checks have a fast path (hyperkern/ops/_validate.py: _fast_ok) that accepts the
common, valid call with plain comparisons and sends everything else through the full, message-giving
checks. These tests mutate valid arguments one at a time (shape, rank, dtype, device, None, type) and
require that the fast path never accepts what the full checks refuse, and that it does accept every
valid call (otherwise it would save nothing)."""
import itertools

import pytest
import torch

from hyperkern.ops import _validate as V

HYPER_ARGS = ("delta", "u", "v", "e1", "delta_bias", "e2")


def _linear_args(E=3, B=2, fin=5, fout=4, hyper=True, bias=True):
    t = lambda *shape: torch.randn(*shape)  # noqa: E731
    args = {"x": t(E * B, fin), "weight": t(fout, fin), "r": t(E, fin), "s": t(E, fout),
            "bias": t(E, fout) if bias else None}
    if hyper:
        args.update(delta=t(fout, fin), u=t(E, fin), v=t(E, fout), e1=t(E * B, fout),
                    delta_bias=t(E, fout) if bias else None, e2=t(E * B, fout) if bias else None)
    return args


def _conv_args(E=3, B=2, cin=4, cout=6, groups=2, hyper=True, bias=True):
    t = lambda *shape: torch.randn(*shape)  # noqa: E731
    args = {"x": t(E * B, cin, 5, 5), "weight": t(cout, cin // groups, 3, 3), "r": t(E, cin), "s": t(E, cout),
            "bias": t(E, cout) if bias else None}
    if hyper:
        args.update(delta=t(cout, cin // groups, 3, 3), u=t(E, cin), v=t(E, cout), e1=t(E * B, cout),
                    delta_bias=t(E, cout) if bias else None, e2=t(E * B, cout) if bias else None)
    return args


def _mutations(t):
    """Ways to break one argument."""
    if t is None:
        return [torch.randn(2, 2), "not a tensor"]
    out = [None, t.double(), t.to(torch.int64), t.to("meta"), t.unsqueeze(0), t[..., :-1] if t.shape[-1] > 1 else
           t.new_zeros(*t.shape[:-1], 2), t[:-1] if t.shape[0] > 1 else t.new_zeros(2, *t.shape[1:]), [1.0]]
    if t.dim() > 1:
        out.append(t.reshape(-1))
    return out


def _full_accepts(full, kwargs) -> bool:
    try:
        full(**kwargs)
        return True
    except (TypeError, ValueError):
        return False


def _linear_full(hyper):
    def run(x, weight, r, s, bias, delta=None, u=None, v=None, e1=None, delta_bias=None, e2=None):
        return V._validate_linear_in_full(x, weight, r, s, bias, delta, u, v, e1, delta_bias, e2, hyper, False)
    return run


def _linear_fast(hyper):
    def run(x, weight, r, s, bias, delta=None, u=None, v=None, e1=None, delta_bias=None, e2=None):
        if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and isinstance(x, torch.Tensor)
                and x.dim() == 2 and x.shape[1] == weight.shape[1]):
            return False
        return V._fast_ok_rank1(x, weight, r, s, bias, 2, weight.shape[1], weight.shape[0], hyper, delta, u, v, e1,
                          delta_bias, e2)
    return run


@pytest.mark.parametrize("hyper,bias", list(itertools.product([False, True], [False, True])))
def test_linear_fast_path_accepts_valid_calls_and_nothing_the_full_checks_refuse(hyper, bias):
    base = _linear_args(hyper=hyper, bias=bias)
    full, fast = _linear_full(hyper), _linear_fast(hyper)
    assert fast(**base) and _full_accepts(full, base)
    assert V.validate_linear(**base, hyper=hyper, check_embeddings=False) == 3
    for name in base:
        for bad in _mutations(base[name]):
            kwargs = dict(base, **{name: bad})
            if fast(**kwargs):
                assert _full_accepts(full, kwargs), f"fast path accepted {name} = {bad!r:.60}"
            elif _full_accepts(full, kwargs) and isinstance(bad, torch.Tensor) and bad.device.type == "cpu":
                pytest.fail(f"fast path refused a call the full checks accept ({name} = shape {tuple(bad.shape)})")


def test_conv_fast_path_matches_the_full_checks():
    for hyper, bias in itertools.product([False, True], [False, True]):
        base = _conv_args(hyper=hyper, bias=bias)
        assert V.validate_conv2d(**base, stride=1, padding=1, dilation=1, groups=2, hyper=hyper,
                                 check_embeddings=False)[0] == 3
        for name in base:
            for bad in _mutations(base[name]):
                kwargs = dict(base, **{name: bad})
                fast_result = full_result = None
                try:
                    fast_result = V.validate_conv2d(**kwargs, stride=1, padding=1, dilation=1, groups=2, hyper=hyper,
                                                    check_embeddings=False)
                except (TypeError, ValueError) as exc:
                    fast_result = type(exc)
                try:
                    V._validate_conv2d_in_full(**{**dict.fromkeys(HYPER_ARGS), **kwargs}, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2,
                                               hyper=hyper, check_embeddings=False)
                    full_result = "ok"
                except (TypeError, ValueError) as exc:
                    full_result = type(exc)
                if full_result != "ok":  # refused in full: the public check must refuse it the same way
                    assert fast_result == full_result, (name, bad if not isinstance(bad, torch.Tensor) else bad.shape)
                else:  # accepted in full: the public check accepts it too
                    assert isinstance(fast_result, tuple), (name, fast_result)
    # geometry that only the full path names: too small an input for the kernel
    base = _conv_args(hyper=False)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        V.validate_conv2d(**{**base, "x": torch.randn(6, 4, 2, 2)}, stride=1, padding=0, dilation=1, groups=2)


def test_fast_path_still_checks_embeddings_are_finite():
    base = _linear_args()
    base["e1"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="e1 contains NaN"):
        V.validate_linear(**base, hyper=True, check_embeddings=True)
    V.validate_linear(**base, hyper=True, check_embeddings=False)  # the layers' path skips the read


@pytest.mark.parametrize("bias", [False, True])
def test_hp_fast_path_matches_the_full_checks(bias):
    base = _linear_args(hyper=True, bias=bias)
    del base["e1"], base["e2"]
    base["hparams"] = torch.rand(6, 3)
    base["embedding"] = torch.randn(8 if bias else 4, 3)
    assert V.validate_linear_hp(**base, check_hparams=False) == 3
    for name in base:
        for bad in _mutations(base[name]):
            kwargs = dict(base, **{name: bad})
            results = []
            for check in (V.validate_linear_hp, V._validate_linear_hp_in_full):
                try:
                    check(**kwargs, check_hparams=False)
                    results.append("ok")
                except (TypeError, ValueError) as exc:
                    results.append(type(exc))
            assert results[0] == results[1], (name, bad.shape if isinstance(bad, torch.Tensor) else bad)


@pytest.mark.parametrize("bias", [False, True])
def test_conv_hp_fast_path_matches_the_full_checks(bias):
    base = _conv_args(hyper=True, bias=bias)
    del base["e1"], base["e2"]
    base["hparams"] = torch.rand(6, 3)
    base["embedding"] = torch.randn(12 if bias else 6, 3)
    geo = dict(stride=1, padding=1, dilation=1, groups=2, check_hparams=False)
    assert V.validate_conv2d_hp(**base, **geo)[0] == 3
    for name in base:
        for bad in _mutations(base[name]):
            kwargs = dict(base, **{name: bad})
            results = []
            for check in (V.validate_conv2d_hp, V._validate_conv2d_hp_in_full):
                try:
                    check(**kwargs, **geo)
                    results.append("ok")
                except (TypeError, ValueError) as exc:
                    results.append(type(exc))
            assert results[0] == results[1], (name, bad.shape if isinstance(bad, torch.Tensor) else bad)


# ---- the cpp ops run before the Python checks (hyperkern._backends.kernel_first) -------------------

def _linear_ops():
    """(name, public op, its full Python check, valid keyword arguments) for the three linear ops."""
    import hyperkern.ops as ops

    batch, hyper = _linear_args(hyper=False), _linear_args(hyper=True)
    hp = {k: v for k, v in hyper.items() if k not in ("e1", "e2")}
    hp.update(hparams=torch.rand(6, 3), embedding=torch.randn(8, 3))
    return [
        ("batch", ops.batch_ensemble_linear, _linear_full(False), batch),
        ("hyper", ops.hyper_batch_ensemble_linear, _linear_full(True), hyper),
        ("hp", ops.hyper_batch_ensemble_linear_hp,
         lambda **kw: V._validate_linear_hp_in_full(**kw, check_hparams=False), hp),
    ]


def _cpp_cpu(device="cpu"):
    import hyperkern

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if "cpp" not in hyperkern.available_backends(device):
        pytest.skip(f"the cpp extension has no {device} kernels")


def _on(device, args):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _device_mutations(t, device):
    """_mutations, plus on CUDA the argument left on the CPU (the CUDA kernels' device check)."""
    out = _mutations(t)
    if device == "cuda" and isinstance(t, torch.Tensor):
        out.append(t.cpu())
    return out


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("which", ["batch", "hyper", "hp"])
def test_cpp_ops_refuse_what_the_python_checks_refuse_with_their_errors(which, device):
    """The public linear ops call the C++ op first and validate only when it raises. So the kernel must
    refuse every argument the Python checks refuse, and the error users see must be the Python one
    (TypeError / ValueError naming the argument), never the kernel's RuntimeError, and never an output."""
    _cpp_cpu(device)
    name, op, full, base = next(c for c in _linear_ops() if c[0] == which)
    base = _on(device, base)
    assert op(**base, backend="cpp").shape == (6, 4)
    for arg in base:
        for bad in _device_mutations(base[arg], device):
            kwargs = dict(base, **{arg: bad})
            try:
                full(**kwargs)
                expected = None
            except (TypeError, ValueError) as exc:
                expected = exc
            if expected is None:
                continue  # a valid variant (e.g. an absent optional argument)
            with pytest.raises(type(expected)) as got:
                op(**kwargs, backend="cpp")
            assert str(got.value) == str(expected), (arg, got.value)


@pytest.mark.parametrize("which", ["batch", "hyper", "hp"])
def test_cpp_ops_skip_the_python_checks_on_valid_calls_but_not_the_value_checks(which, monkeypatch):
    _cpp_cpu()
    import hyperkern.ops.linear as L

    name, op, _, base = next(c for c in _linear_ops() if c[0] == which)
    expected = op(**base, backend="cpp")

    def refuse(*args, **kwargs):
        raise AssertionError("the Python validation ran on a valid cpp call")

    monkeypatch.setattr(L, "validate_linear", refuse)
    monkeypatch.setattr(L, "validate_linear_hp", refuse)
    torch.testing.assert_close(op(**base, backend="cpp"), expected, rtol=0, atol=0)
    if which == "batch":
        return
    # the public hyper ops still refuse NaN in the embeddings / hyperparameters, after the kernel accepted
    # the shapes
    key = "e1" if which == "hyper" else "hparams"
    bad = dict(base, **{key: base[key].clone()})
    bad[key][0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{key} contains NaN"):
        op(**bad, backend="cpp")


def test_hyper_op_finiteness_check_reads_the_output_first():
    """The public hyper op reads y once and e1 / e2 only when y is not finite. That must still refuse an
    Inf in e1 where it meets a zero (v = 0: inf * 0), an Inf in e2 alone, and NaN in either, and must
    not refuse a NaN that comes from x (it propagates, as in torch)."""
    _cpp_cpu()
    import hyperkern.ops as ops

    base = _linear_args(hyper=True, bias=True)
    for backend in ("cpp", "torch"):
        for key, value, zero_v in (("e1", float("inf"), True), ("e1", float("nan"), False),
                                   ("e2", float("-inf"), False), ("e2", float("nan"), True)):
            bad = dict(base, v=torch.zeros_like(base["v"]) if zero_v else base["v"], **{key: base[key].clone()})
            bad[key][1, 2] = value
            with pytest.raises(ValueError, match=f"{key} contains NaN or Inf"):
                ops.hyper_batch_ensemble_linear(**bad, backend=backend)
        x = base["x"].clone()
        x[0, 0] = float("nan")
        y = ops.hyper_batch_ensemble_linear(**dict(base, x=x), backend=backend)
        assert y[0].isnan().any() and y[1:].isfinite().all()


def _conv_ops():
    """(name, public op, its full Python check, valid keyword arguments) for the three conv ops."""
    import hyperkern.ops as ops

    geo = dict(stride=1, padding=1, dilation=1, groups=2)
    full_geo = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2)
    batch, hyper = _conv_args(hyper=False), _conv_args(hyper=True)
    hp = {k: v for k, v in hyper.items() if k not in ("e1", "e2")}
    hp.update(hparams=torch.rand(6, 3), embedding=torch.randn(12, 3))

    def full(hyper_):
        def run(**kw):
            kw = {**dict.fromkeys(HYPER_ARGS), **kw}
            V._validate_conv2d_in_full(**kw, **full_geo, hyper=hyper_, check_embeddings=False)
        return run

    return geo, [
        ("batch", ops.batch_ensemble_conv2d, full(False), batch),
        ("hyper", ops.hyper_batch_ensemble_conv2d, full(True), hyper),
        ("hp", ops.hyper_batch_ensemble_conv2d_hp,
         lambda **kw: V._validate_conv2d_hp_in_full(**kw, **full_geo, check_hparams=False), hp),
    ]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("which", ["batch", "hyper", "hp"])
def test_cpp_conv_ops_refuse_what_the_python_checks_refuse_with_their_errors(which, device):
    """As test_cpp_ops_refuse_what_the_python_checks_refuse_with_their_errors, for the conv ops, plus
    geometry that only the full checks name and non-tensor arguments the kernel call never sees."""
    _cpp_cpu(device)
    geo, cases = _conv_ops()
    name, op, full, base = next(c for c in cases if c[0] == which)
    base = _on(device, base)
    assert op(**base, **geo, backend="cpp").shape == (6, 6, 5, 5)
    for arg in base:
        for bad in _device_mutations(base[arg], device):
            kwargs = dict(base, **{arg: bad})
            try:
                full(**kwargs)
                continue  # a valid variant (e.g. an absent optional argument)
            except (TypeError, ValueError) as exc:
                expected = exc
            with pytest.raises(type(expected)) as got:
                op(**kwargs, **geo, backend="cpp")
            assert str(got.value) == str(expected), (arg, got.value)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):  # the kernel refuses it too
        op(**dict(base, x=torch.randn(6, 4, 1, 1, device=device)), **dict(geo, padding=0), backend="cpp")
    for key, value in (("stride", True), ("groups", 0), ("padding", (1, 2, 3))):
        with pytest.raises((TypeError, ValueError), match=key):
            op(**base, **dict(geo, **{key: value}), backend="cpp")


@pytest.mark.parametrize("which", ["batch", "hyper", "hp"])
def test_cpp_conv_ops_skip_the_python_checks_on_valid_calls(which, monkeypatch):
    _cpp_cpu()
    import hyperkern.ops.conv as C

    geo, cases = _conv_ops()
    name, op, _, base = next(c for c in cases if c[0] == which)
    expected = op(**base, **geo, backend="cpp")

    def refuse(*args, **kwargs):
        raise AssertionError("the Python validation ran on a valid cpp call")

    monkeypatch.setattr(C, "validate_conv2d", refuse)
    monkeypatch.setattr(C, "validate_conv2d_hp", refuse)
    torch.testing.assert_close(op(**base, **geo, backend="cpp"), expected, rtol=0, atol=0)
    if which == "hyper":  # NaN in e2 alone, with v = 0 elsewhere: still refused after one read of y
        bad = dict(base, e2=base["e2"].clone(), v=torch.zeros_like(base["v"]))
        bad["e2"][2, 1] = float("nan")
        with pytest.raises(ValueError, match="e2 contains NaN"):
            op(**bad, **geo, backend="cpp")
