"""Input validation at the public op boundary. Kernels assume what is checked here."""
from __future__ import annotations

import math

import torch

from hyperkern._backends import is_compiling as _is_compiling

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_tensor(name: str, t, ndim: int | None = None, optional: bool = False):
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float64, bfloat16 or float16), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_shape(name: str, t, expected: tuple[int, ...], what: str):
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(t.shape)}")


def check_same(named: dict):
    """All given tensors share x's dtype and device (x is the first entry)."""
    items = [(n, t) for n, t in named.items() if t is not None]
    ref_name, ref = items[0]
    for name, t in items[1:]:
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; all inputs must share one dtype")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must be on one device")


def ensemble_size(x: torch.Tensor, r: torch.Tensor, r_name: str = "r") -> int:
    E = r.shape[0]
    if E < 1:
        raise ValueError(f"{r_name} must have at least one row (one per ensemble member), got shape {tuple(r.shape)}")
    if x.shape[0] % E != 0:
        raise ValueError(f"x.shape[0] = {x.shape[0]} must be divisible by the ensemble size E = {r_name}.shape[0] = {E} "
                         "(rows are member-major: E blocks of B rows)")
    return E


def all_finite(t) -> bool:
    """Whether t holds no NaN / Inf. Reads the values (a device sync on CUDA); True under torch.compile
    and for meta tensors, which have no values (shape inference runs on them)."""
    if _is_compiling() or t.device.type == "meta":
        return True
    # One reduction read as a Python float instead of an elementwise mask (torch.isfinite is several
    # ops): any NaN/Inf makes the sum non-finite. A finite tensor whose sum overflows is rare; the exact
    # elementwise check settles that case.
    total = t.detach().sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).item()
    return math.isfinite(total) or bool(torch.isfinite(t).all())


def check_finite(name: str, t, what: str = "the hyperparameter embedding"):
    """Refuse NaN / Inf in t (see all_finite)."""
    if t is not None and not all_finite(t):
        raise ValueError(f"{name} contains NaN or Inf; {what} must be finite")


def check_embeddings_finite(e1, e2, y=None):
    """Refuse NaN / Inf in the per-row embeddings e1, e2 of a hyper op. Given the op's output y, read y
    first and e1, e2 only when y is not finite: a NaN / Inf in e1 or e2 makes y non-finite at the same
    row and column (linear) or over that channel's plane (conv), since e1 multiplies v_k * delta_out
    (inf * 0 is NaN) and e2 multiplies delta_bias_k, and a NaN absorbs every sum. One read instead of two
    (one device sync on CUDA). A NaN in x or the weights also makes y non-finite; then e1 and e2 are read,
    and the op returns y as torch would."""
    if y is None or not all_finite(y):
        check_finite("e1", e1)
        check_finite("e2", e2)


def check_hparams_finite(hparams, embedding):
    """Refuse NaN / Inf in the hp ops' hyperparameters and embedding weight."""
    check_finite("hparams", hparams, "the hyperparameters")
    check_finite("embedding", embedding, "the embedding weight")


def _check_members_and_hyper(x, weight, r, s, bias, E, in_dim, out_dim, unit, row, hyper,
                             delta, u, v, e1, delta_bias, e2, check_embeddings=True) -> dict:
    """Checks shared by the linear and conv ops: the shapes of the per-member vectors (E, in) /
    (E, out), and for the hyper ops of delta, u, v and the per-row embeddings e1, e2; then that every
    tensor shares x's dtype and device; then (hyper and check_embeddings) that e1 and e2 are finite,
    which reads the values (a device sync on CUDA): last, so that an input on another device (or on
    meta) is named as such rather than failing to be read."""
    N = x.shape[0]
    check_shape("r", r, (E, in_dim), f"(ensemble_size, in_{unit})")
    check_shape("s", s, (E, out_dim), f"(ensemble_size, out_{unit})")
    check_shape("bias", bias, (E, out_dim), f"(ensemble_size, out_{unit})")
    named = {"x": x, "weight": weight, "r": r, "s": s, "bias": bias}
    if not hyper:
        check_same(named)
        return named
    for name, t in (("delta", delta), ("u", u), ("v", v), ("e1", e1)):
        check_tensor(name, t, weight.dim() if name == "delta" else 2)
    check_tensor("delta_bias", delta_bias, 2, optional=True)
    check_tensor("e2", e2, 2, optional=True)
    check_shape("delta", delta, tuple(weight.shape), "same shape as weight")
    check_shape("u", u, (E, in_dim), f"(ensemble_size, in_{unit})")
    check_shape("v", v, (E, out_dim), f"(ensemble_size, out_{unit})")
    check_shape("e1", e1, (N, out_dim), f"(E*B, out_{unit}): one embedding row per {row}")
    check_shape("delta_bias", delta_bias, (E, out_dim), f"(ensemble_size, out_{unit})")
    check_shape("e2", e2, (N, out_dim), f"(E*B, out_{unit}): one embedding row per {row}")
    if (delta_bias is None) != (e2 is None):
        raise ValueError("delta_bias and e2 must be given together (the hyper bias term is delta_bias * e2), "
                         f"got delta_bias={'None' if delta_bias is None else 'Tensor'}, "
                         f"e2={'None' if e2 is None else 'Tensor'}")
    named.update(delta=delta, u=u, v=v, e1=e1, delta_bias=delta_bias, e2=e2)
    check_same(named)
    if check_embeddings:
        check_embeddings_finite(e1, e2)
    return named


def _fast_ok(x, weight, r, s, x_dim, in_dim, out_dim, members=(), rows=(), fixed=()) -> bool:
    """True when the tensor arguments certainly pass every check of the full path (the common case: the
    ops run on every layer call, and on small networks the checks' host cost is a visible part of a
    step), tested with plain comparisons and no message building. False sends the call through the
    full checks, which name what is wrong. The caller has checked that weight is a tensor of the right
    rank, that x's row width is in_dim and that the required tensors are present.

    members: (tensor, width) expected (E, width); rows: (tensor, width) expected (E*B, width); fixed:
    (tensor, shape). None tensors are skipped (absent optional arguments)."""
    Tensor = torch.Tensor
    if not (isinstance(x, Tensor) and isinstance(r, Tensor) and isinstance(s, Tensor)) or x.dim() != x_dim \
            or r.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        return False
    E, N = r.shape[0], x.shape[0]
    if E < 1 or N % E or r.shape[1] != in_dim or s.shape != (E, out_dim):
        return False
    dtype, device = x.dtype, x.device
    if weight.dtype != dtype or r.dtype != dtype or s.dtype != dtype or weight.device != device \
            or r.device != device or s.device != device:
        return False
    for t, width in members:
        if t is not None and (not isinstance(t, Tensor) or t.shape != (E, width) or t.dtype != dtype
                              or t.device != device):
            return False
    for t, width in rows:
        if t is not None and (not isinstance(t, Tensor) or t.shape != (N, width) or t.dtype != dtype
                              or t.device != device):
            return False
    for t, shape in fixed:
        if t is not None and (not isinstance(t, Tensor) or t.shape != shape or t.dtype != dtype
                              or t.device != device):
            return False
    return True


def _fast_ok_rank1(x, weight, r, s, bias, x_dim, in_dim, out_dim, hyper, delta, u, v, e1, delta_bias, e2) -> bool:
    """_fast_ok for the batch and hyper (e1 / e2) ops' arguments."""
    if not hyper:
        return _fast_ok(x, weight, r, s, x_dim, in_dim, out_dim, members=((bias, out_dim),))
    if delta is None or u is None or v is None or e1 is None or (delta_bias is None) != (e2 is None):
        return False
    return _fast_ok(x, weight, r, s, x_dim, in_dim, out_dim,
                    members=((bias, out_dim), (u, in_dim), (v, out_dim), (delta_bias, out_dim)),
                    rows=((e1, out_dim), (e2, out_dim)), fixed=((delta, weight.shape),))


def validate_linear(x, weight, r, s, bias, delta=None, u=None, v=None, e1=None, delta_bias=None, e2=None,
                    hyper: bool = False, check_embeddings: bool = True) -> int:
    """Validate the linear ops' arguments (docs/design.md contract) and return the ensemble size E."""
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and isinstance(x, torch.Tensor) and x.dim() == 2 \
            and x.shape[1] == weight.shape[1] \
            and _fast_ok_rank1(x, weight, r, s, bias, 2, weight.shape[1], weight.shape[0], hyper, delta, u, v, e1,
                               delta_bias, e2):
        if hyper and check_embeddings:
            check_embeddings_finite(e1, e2)
        return r.shape[0]
    return _validate_linear_in_full(x, weight, r, s, bias, delta, u, v, e1, delta_bias, e2, hyper, check_embeddings)


def _check_linear_core(x, weight, r, s, bias) -> tuple[int, int, int]:
    """The linear ops' shared full checks of x, weight, r, s and bias (their ranks and dtypes, the
    ensemble size, x's width); returns (E, out_features, in_features)."""
    check_tensor("x", x, 2)
    check_tensor("weight", weight, 2)
    check_tensor("r", r, 2)
    check_tensor("s", s, 2)
    check_tensor("bias", bias, 2, optional=True)
    out_f, in_f = weight.shape
    E = ensemble_size(x, r)
    if x.shape[1] != in_f:
        raise ValueError(f"x must have shape (E*B, in_features={in_f}) to match weight (out, in) = {tuple(weight.shape)}, "
                         f"got {tuple(x.shape)}")
    return E, out_f, in_f


def _validate_linear_in_full(x, weight, r, s, bias, delta, u, v, e1, delta_bias, e2, hyper, check_embeddings) -> int:
    """Every check of validate_linear one by one, each with its message (the path of invalid arguments)."""
    E, out_f, in_f = _check_linear_core(x, weight, r, s, bias)
    _check_members_and_hyper(x, weight, r, s, bias, E, in_f, out_f, "features", "input row", hyper,
                             delta, u, v, e1, delta_bias, e2, check_embeddings)
    return E


def _check_hp_rest(x, weight, E, in_size, out_size, unit, row, delta, u, v, hparams, embedding, bias, delta_bias,
                   r, s, check_hparams) -> None:
    """The checks the hp ops add to the batch op's (shared by linear and conv): delta, u, v, delta_bias,
    hparams (one `row` of x each) and the embedding weight, devices and dtypes, and (check_hparams) the
    finiteness of hparams and embedding. `unit`: "features" or "channels"."""
    check_tensor("delta", delta, weight.dim())
    for name, t in (("u", u), ("v", v), ("hparams", hparams), ("embedding", embedding)):
        check_tensor(name, t, 2)
    check_tensor("delta_bias", delta_bias, 2, optional=True)
    check_shape("delta", delta, tuple(weight.shape), "same shape as weight")
    check_shape("u", u, (E, in_size), f"(ensemble_size, in_{unit})")
    check_shape("v", v, (E, out_size), f"(ensemble_size, out_{unit})")
    check_shape("delta_bias", delta_bias, (E, out_size), f"(ensemble_size, out_{unit})")
    m, N = hparams.shape[1], x.shape[0]
    if hparams.shape[0] != N:
        raise ValueError(f"hparams must have shape ({N}, num_hparams) (E*B, num_hparams): one row of normalised "
                         f"hyperparameters per {row} of x, got {tuple(hparams.shape)}")
    rows = 2 * out_size if delta_bias is not None else out_size
    what = (f"(2*out_{unit}, num_hparams): rows [0, out) give e1, rows [out, 2*out) give e2, as the layer's "
            "nn.Linear(num_hparams, 2*out, bias=False).weight" if delta_bias is not None else
            f"(out_{unit}, num_hparams): e1 = hparams @ embedding^T, as the layer's "
            "nn.Linear(num_hparams, out, bias=False).weight (2*out rows need delta_bias)")
    check_shape("embedding", embedding, (rows, m), what)
    check_same({"x": x, "weight": weight, "r": r, "s": s, "bias": bias, "delta": delta, "u": u, "v": v,
                "hparams": hparams, "embedding": embedding, "delta_bias": delta_bias})
    if check_hparams:
        check_hparams_finite(hparams, embedding)


def validate_linear_hp(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias,
                       check_hparams: bool = True) -> int:
    """Validate hyper_batch_ensemble_linear_hp's arguments and return the ensemble size E: those of the
    hyper linear op, with hparams (E*B, m) and the embedding weight (out, m), or (2*out, m) with
    delta_bias, in place of e1 / e2. check_hparams: refuse NaN / Inf in hparams and embedding (reads
    the values: a device sync on CUDA)."""
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and isinstance(x, torch.Tensor) and x.dim() == 2 \
            and x.shape[1] == weight.shape[1] and delta is not None and u is not None and v is not None \
            and embedding is not None and isinstance(hparams, torch.Tensor) and hparams.dim() == 2:
        out_f, in_f = weight.shape
        m = hparams.shape[1]
        rows = 2 * out_f if delta_bias is not None else out_f
        if _fast_ok(x, weight, r, s, 2, in_f, out_f,
                    members=((bias, out_f), (u, in_f), (v, out_f), (delta_bias, out_f)), rows=((hparams, m),),
                    fixed=((delta, weight.shape), (embedding, (rows, m)))):
            if check_hparams:
                check_hparams_finite(hparams, embedding)
            return r.shape[0]
    return _validate_linear_hp_in_full(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias,
                                       check_hparams)


def _validate_linear_hp_in_full(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias,
                                check_hparams) -> int:
    """Every check of validate_linear_hp one by one, each with its message."""
    E, out_f, in_f = _check_linear_core(x, weight, r, s, bias)
    check_shape("r", r, (E, in_f), "(ensemble_size, in_features)")
    check_shape("s", s, (E, out_f), "(ensemble_size, out_features)")
    check_shape("bias", bias, (E, out_f), "(ensemble_size, out_features)")
    _check_hp_rest(x, weight, E, in_f, out_f, "features", "row", delta, u, v, hparams, embedding, bias,
                   delta_bias, r, s, check_hparams)
    return E


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    # fast path for what the layers pass on every call (two plain ints)
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int \
            and value[0] >= minimum and value[1] >= minimum:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in value):
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    return (int(value[0]), int(value[1]))


def conv_geometry(stride, padding, dilation, groups) -> tuple:
    """(stride, padding, dilation) as pairs of ints and groups, checked: the conv ops' non-tensor arguments."""
    stride = _pair("stride", stride, 1)
    padding = _pair("padding", padding, 0)
    dilation = _pair("dilation", dilation, 1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    return stride, padding, dilation, groups


def validate_conv2d(x, weight, r, s, bias, stride, padding, dilation, groups, delta=None, u=None, v=None, e1=None,
                    delta_bias=None, e2=None, hyper: bool = False, check_embeddings: bool = True):
    """Validate the conv ops' arguments; return (E, stride, padding, dilation, groups) normalised."""
    stride, padding, dilation, groups = conv_geometry(stride, padding, dilation, groups)
    if isinstance(weight, torch.Tensor) and weight.dim() == 4 and isinstance(x, torch.Tensor) and x.dim() == 4:
        out_c, cg, kh, kw = weight.shape
        if out_c % groups == 0 and x.shape[1] == cg * groups \
                and x.shape[2] + 2 * padding[0] > dilation[0] * (kh - 1) \
                and x.shape[3] + 2 * padding[1] > dilation[1] * (kw - 1) \
                and _fast_ok_rank1(x, weight, r, s, bias, 4, cg * groups, out_c, hyper, delta, u, v, e1,
                                   delta_bias, e2):
            if hyper and check_embeddings:
                check_embeddings_finite(e1, e2)
            return r.shape[0], stride, padding, dilation, groups
    return _validate_conv2d_in_full(x, weight, r, s, bias, stride, padding, dilation, groups, delta, u, v, e1,
                                    delta_bias, e2, hyper, check_embeddings)


def _validate_conv2d_in_full(x, weight, r, s, bias, stride, padding, dilation, groups, delta, u, v, e1, delta_bias,
                             e2, hyper, check_embeddings):
    """Every check of validate_conv2d after the geometry one by one, each with its message."""
    check_tensor("x", x, 4)
    check_tensor("weight", weight, 4)
    check_tensor("r", r, 2)
    check_tensor("s", s, 2)
    check_tensor("bias", bias, 2, optional=True)
    out_c, cg, kh, kw = weight.shape
    in_c = cg * groups
    if out_c % groups != 0:
        raise ValueError(f"weight.shape[0] = {out_c} output channels must be divisible by groups = {groups}")
    h_eff = x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1)
    w_eff = x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1)
    E = ensemble_size(x, r)
    if x.shape[1] != in_c:
        raise ValueError(f"x must have {in_c} channels (weight {tuple(weight.shape)} with groups={groups}), "
                         f"got x of shape {tuple(x.shape)}")
    if h_eff < 1 or w_eff < 1:
        raise ValueError(f"x spatial size {tuple(x.shape[2:])} with padding {padding} is smaller than the dilated "
                         f"kernel {(dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)}")
    named = _check_members_and_hyper(x, weight, r, s, bias, E, in_c, out_c, "channels", "image", hyper,
                                     delta, u, v, e1, delta_bias, e2, check_embeddings)
    return E, stride, padding, dilation, groups


def validate_conv2d_hp(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, stride, padding, dilation,
                       groups, check_hparams: bool = True):
    """Validate hyper_batch_ensemble_conv2d_hp's arguments; return (E, stride, padding, dilation, groups)
    normalised: those of the hyper conv op, with hparams (E*B, m) and the embedding weight (O, m), or
    (2*O, m) with delta_bias, in place of e1 / e2. check_hparams: refuse NaN / Inf in hparams and embedding
    (reads the values: a device sync on CUDA)."""
    stride, padding, dilation, groups = conv_geometry(stride, padding, dilation, groups)
    if isinstance(weight, torch.Tensor) and weight.dim() == 4 and isinstance(x, torch.Tensor) and x.dim() == 4 \
            and delta is not None and u is not None and v is not None and embedding is not None \
            and isinstance(hparams, torch.Tensor) and hparams.dim() == 2:
        out_c, cg, kh, kw = weight.shape
        m = hparams.shape[1]
        rows = 2 * out_c if delta_bias is not None else out_c
        if out_c % groups == 0 and x.shape[1] == cg * groups \
                and x.shape[2] + 2 * padding[0] > dilation[0] * (kh - 1) \
                and x.shape[3] + 2 * padding[1] > dilation[1] * (kw - 1) \
                and _fast_ok(x, weight, r, s, 4, cg * groups, out_c,
                             members=((bias, out_c), (u, cg * groups), (v, out_c), (delta_bias, out_c)),
                             rows=((hparams, m),), fixed=((delta, weight.shape), (embedding, (rows, m)))):
            if check_hparams:
                check_hparams_finite(hparams, embedding)
            return r.shape[0], stride, padding, dilation, groups
    return _validate_conv2d_hp_in_full(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, stride,
                                       padding, dilation, groups, check_hparams)


def _validate_conv2d_hp_in_full(x, weight, delta, r, s, u, v, hparams, embedding, bias, delta_bias, stride, padding,
                                dilation, groups, check_hparams):
    """Every check of validate_conv2d_hp one by one, each with its message: the batch op's, then the hyper
    and hp ones."""
    E, stride, padding, dilation, groups = validate_conv2d(x, weight, r, s, bias, stride, padding, dilation, groups)
    _check_hp_rest(x, weight, E, x.shape[1], weight.shape[0], "channels", "image", delta, u, v, hparams, embedding,
                   bias, delta_bias, r, s, check_hparams)
    return E, stride, padding, dilation, groups
