"""Triton implicit-GEMM kernels for the rank-1 ensemble convolutions (installed as hyperkern.kernels.rank1_conv).

Row layout: images are member-major, x is (E*B, C_in, H, W) and images k*B .. (k+1)*B-1 belong to
member k. The ops (hyperkern/ops/conv.py) compute, per member k and image n of that member,

    y[n] = s_k * conv(x[n] * r_k, W) + b_k                                        (batch ensemble)
    y[n] = s_k * conv(x[n] * r_k, W) + v_k * e1[n] * conv(x[n] * u_k, Delta)
           + b_k + delta_bias_k * e2[n]                                          (hyper-batch ensemble)

with r_k, u_k on input channels and s_k, v_k, b_k, delta_bias_k, e1[n], e2[n] on output channels.
All members run in one launch per pass; every GEMM tile belongs to exactly one member (and one
channel group), so the member's vectors are loaded once per tile and applied in registers:

- forward (`rank1_conv2d_forward`): implicit GEMM, M = the member's output pixels (B*Ho*Wo),
  N = output channels of the group, K = (kh, kw, input channel of the group). The gathered x tile is
  multiplied by r_k (and u_k) before tl.dot; s_k, b_k (and v_k*e1, delta_bias_k*e2) are applied to
  the fp32 accumulators in the epilogue, which stores in the output's layout (NCHW or NHWC: any
  strides). The hyper op keeps a second accumulator against Delta that shares the x loads.
- input gradient (`rank1_conv2d_input_grad`): the transposed convolution as an implicit GEMM,
  M = the member's input pixels of one stride phase (hi % sh, wi % sw), N = input channels, K =
  (the kernel taps that reach that phase, output channels). Splitting by phase means a tile only
  visits taps that map to an output pixel, so stride > 1 wastes no work. The gradient tile is scaled
  by s_k (and v_k*e1) on load; the epilogue multiplies by r_k (and u_k).
- weight gradient (`rank1_conv2d_weight_grad`): per member the plain weight gradient
  G_k[o, (c, i, j)] = sum over the member's pixels of g[n, o, p] * x[n, c, p shifted by (i, j)] is an
  implicit GEMM with K = pixels, split over programs along the pixels. Everything else is linear in
  G_k and reduced from the fp32 accumulator in the epilogue with atomic adds:
      dW += s_k[o] r_k[c] G_k,  ds_k[o] += sum_(c,i,j) W r_k G_k,  dr_k[c] += sum_(o,i,j) s_k W G_k.
  The hyper op also needs each image's gradient G_n for de1, so its programs cut their pixel range at
  image boundaries and accumulate GD_k = sum_n e1[n] G_n in registers:
      dDelta += v_k u_k GD_k,  dv_k += sum Delta u_k GD_k,  du_k += sum v_k Delta GD_k,
      de1[n, o] += v_k[o] sum_(c,i,j) Delta u_k G_n.
  Atomic accumulation makes the float32 rounding order (not the math) vary from run to run.

Kernels assume validated input (hyperkern.ops._validate.validate_conv2d): the small per-member
vectors contiguous; x / grad / outputs with any strides; weight / delta of any layout (the launchers
pass them in the layout each kernel reads along K: see _weight_layout). The bias gradients (sums of
the gradient over pixels) are formed by the caller. Layouts: the kernels take any strides, but only
channels-last activations give 16-byte vector loads into the cp.async pipelines (and the sm_90 specs
cover that specialisation), so hyperkern.ops._triton_conv passes activations channels-last (copying
other layouts at the op boundary). Launches whose channel counts / strides are not multiples of 16
use a separate set of smaller tiles (see _TILES). Precision: bf16 / fp16 and float32 as TF32 (or 3xTF32 when
torch.backends.cudnn.allow_tf32 is off) on Hopper wgmma with fp32 accumulators; float64 with float64
accumulators (DMMA). `sm90_compile_specs()` lists every kernel x config x dtype for the static sm_90
compile check (bench/static_gpu_report.py).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import refuse_interpreted_bfloat16, zero_present

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["rank1_conv2d_forward", "rank1_conv2d_input_grad", "rank1_conv2d_weight_grad", "sm90_compile_specs",
           "conv2d_output_size"]

# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
# H100 (sm_90) opt-in shared memory per block, in bytes.
SM90_MAX_SHARED = 232448

# Tiles per kernel and op: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, classes it is launched
# for). A class is the precision, "16bit" (bf16 / fp16), "tf32", "tf32x3" (float32 with
# torch.backends.cudnn.allow_tf32 off) or "fp64", plus "/u" for unaligned launches: some channel
# count or stride is not a multiple of 16 elements or a pointer not 16-byte aligned (the first layer's
# 3 input channels, LeNet's 6). Unaligned loads are scalar gathers that need an address register each,
# so those launches get smaller, shallower tiles (8 warps). Every entry compiles for sm_90 without
# spills and with HGMMA (DMMA for fp64) in its main loop, in its worst specialisation: see
# sm90_compile_specs() and bench/static_gpu_report.py.
_ALL = ("16bit", "tf32", "tf32x3")
_T16 = ("16bit", "tf32")  # not tf32x3: its split operands spill at these tiles
_U_ALL = ("16bit/u", "tf32/u", "tf32x3/u")
_U_T16 = ("16bit/u", "tf32/u")
_FP64 = ("fp64", "fp64/u")
_TILES = {
    ("forward", False): (
        (128, 128, 32, 8, 3, _ALL),
        (128, 128, 64, 8, 3, _T16),
        (128, 64, 32, 4, 4, _T16),
        (128, 64, 64, 8, 3, _T16),
        (64, 128, 32, 4, 4, _ALL),
        (64, 64, 64, 4, 4, _T16),
        (64, 64, 32, 4, 3, _ALL),
        (128, 64, 32, 8, 2, _U_ALL),
        (64, 64, 32, 8, 2, _U_ALL),
        (32, 32, 16, 4, 2, _FP64),
    ),
    ("forward", True): (  # two accumulators, two weight tiles, x scaled twice
        (128, 64, 64, 8, 3, _T16),
        (128, 64, 32, 8, 4, _T16),
        (64, 128, 64, 8, 3, ("16bit",)),
        (64, 64, 64, 8, 3, _T16),
        (64, 64, 32, 8, 4, _ALL),
        (64, 64, 32, 4, 3, _ALL),
        (64, 64, 32, 8, 2, _U_ALL),
        (64, 64, 16, 8, 2, _U_ALL),
        (32, 32, 16, 4, 2, _FP64),
    ),
    ("input_grad", False): (
        (128, 128, 32, 8, 3, _ALL),
        (128, 128, 64, 8, 3, _T16),
        (128, 64, 32, 4, 4, _T16),
        (128, 64, 64, 8, 3, _T16),
        (64, 128, 32, 4, 4, _T16),
        (64, 64, 64, 4, 4, _T16),
        (64, 64, 32, 4, 3, _ALL),
        (128, 64, 32, 8, 2, _U_ALL),
        (64, 64, 32, 8, 2, _U_ALL),
        (32, 32, 16, 4, 2, _FP64),
    ),
    ("input_grad", True): (
        (128, 128, 32, 8, 3, ("16bit",)),
        (128, 64, 64, 8, 3, ("16bit",)),
        (128, 64, 32, 8, 4, _T16),
        (64, 128, 64, 8, 3, ("16bit",)),
        (64, 64, 64, 8, 3, _T16),
        (64, 64, 32, 8, 4, _ALL),
        (64, 64, 32, 4, 3, _T16),
        (64, 64, 32, 8, 2, _U_T16),
        (64, 64, 16, 8, 2, _U_ALL),
        (32, 32, 16, 4, 2, _FP64),
    ),
    ("weight_grad", False): (  # M = output channels, N = (c, i, j) columns, K = pixels
        (128, 128, 32, 8, 3, _ALL),
        (128, 128, 64, 8, 3, _T16),
        (128, 64, 64, 8, 3, _ALL),
        (64, 128, 64, 8, 3, _ALL),
        (64, 64, 64, 4, 4, _ALL),
        (64, 64, 64, 8, 3, _ALL),
        (64, 64, 32, 4, 3, _ALL),
        (128, 64, 32, 8, 2, _U_ALL),
        (64, 64, 32, 8, 2, _U_ALL),
        (32, 32, 16, 4, 2, _FP64),
    ),
    ("weight_grad", True): (  # three [BM, BN] register tiles: the image's G_n, sum G_n, sum e1 G_n
        (128, 64, 64, 8, 3, ("16bit",)),
        (64, 128, 64, 8, 3, ("16bit",)),
        (64, 64, 64, 8, 3, _T16),  # tf32x3 spills here with Triton 3.6 (7 LDL / 14 STL)
        (64, 64, 32, 8, 4, _ALL),
        (64, 64, 32, 8, 2, _U_T16),
        (64, 64, 16, 8, 2, _U_T16),
        (64, 64, 16, 8, 1, ("tf32x3/u",)),
        (32, 32, 16, 4, 2, _FP64),
    ),
}
# the interpreter runs one small config (tl.dot needs blocks >= 16)
_INTERPRETER_TILE = (16, 16, 16, 4, 1, _ALL + _U_ALL + _FP64)


def _config(tile) -> triton.Config:
    bm, bn, bk, warps, stages, _ = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


def _tiles(kernel: str, hyper: bool):
    return (_INTERPRETER_TILE,) if INTERPRETING else _TILES[(kernel, hyper)]


_CONFIGS = {key: [(_config(t), t) for t in _tiles(*key)] for key in _TILES}


def _dot_precision(dtype: torch.dtype) -> str:
    """float32: TF32 tensor cores when cuDNN convolutions may use them (torch's default,
    torch.backends.cudnn.allow_tf32), else 3xTF32 (about float32 accuracy); IEEE for the rest."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "tf32x3"
    return "ieee"


def _tile_class(dtype: torch.dtype, precision: str, aligned: bool) -> str:
    if dtype == torch.float64:
        cls = "fp64"
    elif dtype == torch.float32:
        cls = precision
    else:
        cls = "16bit"
    return cls if aligned else cls + "/u"


def launchable_configs(kernel: str, hyper: bool, dtype: torch.dtype, precision: str | None = None,
                       aligned: bool = True) -> list:
    """The triton.Config objects the autotuner may launch for kernel ("forward", "input_grad",
    "weight_grad"), op (hyper or not), input dtype, dot precision and alignment."""
    cls = _tile_class(dtype, precision or _dot_precision(dtype), aligned)
    return [c for c, tile in _CONFIGS[(kernel, hyper)] if cls in tile[5]]


def _pruner(kernel: str, hyper: bool, tensor_arg: str):
    def prune(configs, named_args, **kwargs):
        keep = {id(c) for c in launchable_configs(kernel, hyper, named_args[tensor_arg].dtype,
                                                  kwargs.get("DOT_PRECISION"), kwargs.get("ALIGNED", True))}
        return [c for c in configs if id(c) in keep]

    return prune


def _aligned(tensors, ints) -> bool:
    """Whether a launch specialises like the aligned sm_90 specs: every pointer 16-byte aligned and
    every channel count / stride a multiple of 16 (or 1, which Triton turns into a constant)."""
    return (all(t is None or t.data_ptr() % 16 == 0 for t in tensors)
            and all(i == 1 or i % 16 == 0 for i in ints))


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rank1_conv2d_forward_kernel(
    x_ptr, w_ptr, r_ptr, s_ptr, b_ptr,
    d_ptr, u_ptr, v_ptr, e1_ptr, db_ptr, e2_ptr,
    y_ptr,
    B, H, W, Ho, Wo, C_in, C_out, CG_IN, CG_OUT,
    KH, KW, SH, SW, PH, PW, DH, DW,
    sxn, sxc, sxh, sxw, swo, swc, swh, sww, syn, syc, syh, syw,
    HYPER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
    ACC_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M pixels of one member, BLOCK_N output channels of one group] tile of y.

    grid = (E * cdiv(B*Ho*Wo, BLOCK_M), cdiv(CG_OUT, BLOCK_N), groups).
    """
    ACC_TYPE = tl.float64 if ACC_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    grp = tl.program_id(2)
    howo = Ho * Wo
    pixels = B * howo
    tiles_m = tl.cdiv(pixels, BLOCK_M)
    member = pid_m // tiles_m

    m = (pid_m % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < pixels
    img = member * B + m // howo
    pix = m % howo
    ho = pix // Wo
    wo = pix % Wo
    hi0 = ho * SH - PH
    wi0 = wo * SW - PW
    x_img = x_ptr + img.to(tl.int64) * sxn

    o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = o < CG_OUT
    oc = grp * CG_OUT + o
    kk = tl.arange(0, BLOCK_K)
    taps = KH * KW
    w_row = oc * swo  # weight and delta share strides (channels-last in the ops: c is contiguous)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_TYPE)
    acc_delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_TYPE)
    c_blocks = tl.cdiv(CG_IN, BLOCK_K)
    for it in range(0, taps * c_blocks):
        tap = it // c_blocks
        c = (it % c_blocks) * BLOCK_K + kk
        i = tap // KW
        j = tap % KW
        hi = hi0 + i * DH
        wi = wi0 + j * DW
        row_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        c_ok = c < CG_IN
        ci = grp * CG_IN + c
        x_tile = tl.load(x_img[:, None] + (hi * sxh + wi * sxw)[:, None] + ci[None, :] * sxc,
                         mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        w_off = w_row[None, :] + c[:, None] * swc + (i * swh + j * sww)
        w_mask = c_ok[:, None] & o_ok[None, :]
        r_k = tl.load(r_ptr + member * C_in + ci, mask=c_ok, other=0.0)
        w_tile = tl.load(w_ptr + w_off, mask=w_mask, other=0.0)
        acc = tl.dot((x_tile * r_k[None, :]).to(x_tile.dtype), w_tile, acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC_TYPE)
        if HYPER:
            u_k = tl.load(u_ptr + member * C_in + ci, mask=c_ok, other=0.0)
            d_tile = tl.load(d_ptr + w_off, mask=w_mask, other=0.0)
            acc_delta = tl.dot((x_tile * u_k[None, :]).to(x_tile.dtype), d_tile, acc_delta,
                               input_precision=DOT_PRECISION, out_dtype=ACC_TYPE)

    vec = member * C_out + oc
    s_k = tl.load(s_ptr + vec, mask=o_ok, other=0.0).to(ACC_TYPE)
    out = acc * s_k[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + vec, mask=o_ok, other=0.0).to(ACC_TYPE)[None, :]
    tile_ok = m_ok[:, None] & o_ok[None, :]
    if HYPER:
        per_image = img[:, None] * C_out + oc[None, :]  # e1, e2: (E*B, C_out) contiguous
        v_k = tl.load(v_ptr + vec, mask=o_ok, other=0.0).to(ACC_TYPE)
        e1 = tl.load(e1_ptr + per_image, mask=tile_ok, other=0.0).to(ACC_TYPE)
        out += acc_delta * v_k[None, :] * e1
        if HAS_DELTA_BIAS:
            db_k = tl.load(db_ptr + vec, mask=o_ok, other=0.0).to(ACC_TYPE)
            e2 = tl.load(e2_ptr + per_image, mask=tile_ok, other=0.0).to(ACC_TYPE)
            out += db_k[None, :] * e2
    y_off = (img.to(tl.int64) * syn + ho * syh + wo * syw)[:, None] + oc[None, :] * syc
    tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _rank1_conv2d_input_grad_kernel(
    g_ptr, w_ptr, r_ptr, s_ptr,
    d_ptr, u_ptr, v_ptr, e1_ptr,
    dx_ptr,
    B, H, W, Ho, Wo, C_in, C_out, CG_IN, CG_OUT,
    KH, KW, SH, SW, PH, PW, DH, DW, STEP_H, STEP_W,
    sgn, sgc, sgh, sgw, swo, swc, swh, sww, sdn, sdc, sdh, sdw,
    HYPER: tl.constexpr, ACC_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M input pixels of one member and stride phase, BLOCK_N input channels] tile of dx.

    dx[n, c, hi, wi] = r_k[c] * sum_(o, i, j) s_k[o] g[n, o, ho, wo] W[o, c, i, j]  (+ the Delta term
    with u_k and v_k*e1[n]) over the taps with hi = ho*SH - PH + i*DH. Pixels of phase (a, b) are
    hi = a + SH*t, wi = b + SW*q; the taps reaching them are i = i0 + STEP_H*m with
    (a + PH - i*DH) % SH == 0 and STEP_H = SH / gcd(SH, DH), and then ho = t + (a + PH - i*DH) / SH.
    grid = (E * cdiv(B * cdiv(H, SH) * cdiv(W, SW), BLOCK_M), cdiv(CG_IN, BLOCK_N), SH * SW * groups).
    """
    ACC_TYPE = tl.float64 if ACC_FP64 else tl.float32
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    groups = tl.num_programs(2) // (SH * SW)
    grp = pid_z % groups
    phase = pid_z // groups
    ph_a = phase // SW
    ph_b = phase % SW
    h_t = (H - ph_a + SH - 1) // SH  # rows of this phase
    w_t = (W - ph_b + SW - 1) // SW
    tile_pixels = (H + SH - 1) // SH * ((W + SW - 1) // SW) * B  # the largest phase sizes the grid
    tiles_m = tl.cdiv(tile_pixels, BLOCK_M)
    member = pid_m // tiles_m
    phase_pixels = h_t * w_t
    m_start = (pid_m % tiles_m) * BLOCK_M
    m = m_start + tl.arange(0, BLOCK_M)
    m_ok = m < B * phase_pixels
    img = member * B + m // tl.maximum(phase_pixels, 1)
    t = (m % tl.maximum(phase_pixels, 1)) // tl.maximum(w_t, 1)
    q = m % tl.maximum(w_t, 1)

    # first tap of each axis that reaches this phase (none: i_first >= KH, no iterations)
    i_first = KH
    for ii in range(0, STEP_H):
        i_first = tl.where((((ph_a + PH - ii * DH) % SH) == 0) & (ii < i_first), ii, i_first)
    j_first = KW
    for jj in range(0, STEP_W):
        j_first = tl.where((((ph_b + PW - jj * DW) % SW) == 0) & (jj < j_first), jj, j_first)
    n_i = tl.maximum(KH - i_first + STEP_H - 1, 0) // STEP_H
    n_j = tl.maximum(KW - j_first + STEP_W - 1, 0) // STEP_W

    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c < CG_IN
    ci = grp * CG_IN + c
    kk = tl.arange(0, BLOCK_K)
    g_img = g_ptr + img.to(tl.int64) * sgn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_TYPE)
    acc_delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_TYPE)
    o_blocks = tl.cdiv(CG_OUT, BLOCK_K)
    n_iter = tl.where(m_start < B * phase_pixels, n_i * n_j * o_blocks, 0)
    for it in range(0, n_iter):
        tap = it // o_blocks
        o = (it % o_blocks) * BLOCK_K + kk
        i = i_first + (tap // n_j) * STEP_H
        j = j_first + (tap % n_j) * STEP_W
        ho = t + (ph_a + PH - i * DH) // SH  # exact division
        wo = q + (ph_b + PW - j * DW) // SW
        row_ok = m_ok & (ho >= 0) & (ho < Ho) & (wo >= 0) & (wo < Wo)
        o_ok = o < CG_OUT
        oc = grp * CG_OUT + o
        g_mask = row_ok[:, None] & o_ok[None, :]
        g_tile = tl.load(g_img[:, None] + (ho * sgh + wo * sgw)[:, None] + oc[None, :] * sgc,
                         mask=g_mask, other=0.0)
        w_off = oc[:, None] * swo + c[None, :] * swc + (i * swh + j * sww)
        w_mask = o_ok[:, None] & c_ok[None, :]
        s_k = tl.load(s_ptr + member * C_out + oc, mask=o_ok, other=0.0)
        w_tile = tl.load(w_ptr + w_off, mask=w_mask, other=0.0)
        acc = tl.dot((g_tile * s_k[None, :]).to(g_tile.dtype), w_tile, acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC_TYPE)
        if HYPER:
            v_k = tl.load(v_ptr + member * C_out + oc, mask=o_ok, other=0.0)
            e1 = tl.load(e1_ptr + img[:, None] * C_out + oc[None, :], mask=g_mask, other=0.0)
            d_tile = tl.load(d_ptr + w_off, mask=w_mask, other=0.0)
            acc_delta = tl.dot((g_tile * v_k[None, :] * e1).to(g_tile.dtype), d_tile, acc_delta,
                               input_precision=DOT_PRECISION, out_dtype=ACC_TYPE)

    r_k = tl.load(r_ptr + member * C_in + ci, mask=c_ok, other=0.0).to(ACC_TYPE)
    out = acc * r_k[None, :]
    if HYPER:
        u_k = tl.load(u_ptr + member * C_in + ci, mask=c_ok, other=0.0).to(ACC_TYPE)
        out += acc_delta * u_k[None, :]
    hi = ph_a + t * SH
    wi = ph_b + q * SW
    dx_off = (img.to(tl.int64) * sdn + hi * sdh + wi * sdw)[:, None] + ci[None, :] * sdc
    tl.store(dx_ptr + dx_off, out.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def _rank1_conv2d_weight_grad_kernel(
    g_ptr, x_ptr, w_ptr, r_ptr, s_ptr,
    d_ptr, u_ptr, v_ptr, e1_ptr,
    dw_ptr, dr_ptr, ds_ptr, dd_ptr, du_ptr, dv_ptr, de1_ptr,
    B, H, W, Ho, Wo, C_in, C_out, CG_IN, CG_OUT,
    KH, KW, SH, SW, PH, PW, DH, DW,
    PIXELS_PER_PROGRAM, SPLITS,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, swo, swc, swh, sww,
    HYPER: tl.constexpr, CHANNELS_FAST: tl.constexpr, ACC_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """[BLOCK_M output channels, BLOCK_N (c, i, j) columns] of one member's weight gradient over the
    member's pixels [split * PIXELS_PER_PROGRAM, (split + 1) * PIXELS_PER_PROGRAM), reduced into
    dW, dr, ds (and dDelta, du, dv, de1) with atomic adds (all outputs zeroed, ACC_TYPE).

    Columns are ordered (c, i, j) (CHANNELS_FAST=False, for NCHW x) or (i, j, c) (for NHWC x) so that
    consecutive columns are adjacent in memory.
    grid = (cdiv(CG_OUT, BLOCK_M) * cdiv(CG_IN*KH*KW, BLOCK_N), E * SPLITS, groups).
    """
    ACC_TYPE = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    pid_split = tl.program_id(1)
    grp = tl.program_id(2)
    tiles_o = tl.cdiv(CG_OUT, BLOCK_M)
    pid_o = pid % tiles_o
    pid_c = pid // tiles_o
    member = pid_split // SPLITS
    split = pid_split % SPLITS
    taps = KH * KW
    columns = CG_IN * taps

    o = pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
    o_ok = o < CG_OUT
    oc = grp * CG_OUT + o
    col = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = col < columns
    if CHANNELS_FAST:
        c = col % CG_IN
        tap = col // CG_IN
    else:
        c = col // taps
        tap = col % taps
    i = tap // KW
    j = tap % KW
    ci = grp * CG_IN + c
    h_off = i * DH - PH
    w_off = j * DW - PW
    x_col = ci * sxc + h_off * sxh + w_off * sxw

    howo = Ho * Wo
    pixels = B * howo
    p_begin = split * PIXELS_PER_PROGRAM
    p_end = tl.minimum(pixels, p_begin + PIXELS_PER_PROGRAM)
    kk = tl.arange(0, BLOCK_K)
    # weight, delta and the dW / dDelta buffers share strides
    weight_tile_off = oc[:, None] * swo + (c * swc + i * swh + j * sww)[None, :]
    tile_ok = o_ok[:, None] & col_ok[None, :]
    if HYPER:
        v_k = tl.load(v_ptr + member * C_out + oc, mask=o_ok, other=0.0).to(ACC_TYPE)
        u_k = tl.load(u_ptr + member * C_in + ci, mask=col_ok, other=0.0).to(ACC_TYPE)

    g_total = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_TYPE)
    g_delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_TYPE)  # sum over images n of e1[n, o] * G_n
    seg_start = p_begin
    while seg_start < p_end:
        if HYPER:  # segments end at image boundaries: de1 needs each image's own gradient
            seg_end = tl.minimum(p_end, (seg_start // howo + 1) * howo)
        else:
            seg_end = p_end
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_TYPE)
        for p0 in range(seg_start, seg_end, BLOCK_K):
            p = p0 + kk
            p_ok = p < seg_end
            img = member * B + p // howo
            pix = p % howo
            ho = pix // Wo
            wo = pix % Wo
            img64 = img.to(tl.int64)
            g_tile = tl.load(g_ptr + (img64 * sgn + ho * sgh + wo * sgw)[None, :] + oc[:, None] * sgc,
                             mask=o_ok[:, None] & p_ok[None, :], other=0.0)
            hi = (ho * SH)[:, None] + h_off[None, :]
            wi = (wo * SW)[:, None] + w_off[None, :]
            x_mask = p_ok[:, None] & col_ok[None, :] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            x_tile = tl.load(x_ptr + (img64 * sxn + ho * SH * sxh + wo * SW * sxw)[:, None] + x_col[None, :],
                             mask=x_mask, other=0.0)
            acc = tl.dot(g_tile, x_tile, acc, input_precision=DOT_PRECISION, out_dtype=ACC_TYPE)
        g_total += acc
        if HYPER:
            n = member * B + seg_start // howo
            e1 = tl.load(e1_ptr + n * C_out + oc, mask=o_ok, other=0.0).to(ACC_TYPE)
            g_delta += acc * e1[:, None]
            d_tile = tl.load(d_ptr + weight_tile_off, mask=tile_ok, other=0.0).to(ACC_TYPE)
            de1 = tl.sum(acc * d_tile * u_k[None, :], axis=1) * v_k
            tl.atomic_add(de1_ptr + n * C_out + oc, de1, mask=o_ok, sem="relaxed")
        seg_start = seg_end

    s_k = tl.load(s_ptr + member * C_out + oc, mask=o_ok, other=0.0).to(ACC_TYPE)
    r_k = tl.load(r_ptr + member * C_in + ci, mask=col_ok, other=0.0).to(ACC_TYPE)
    w_tile = tl.load(w_ptr + weight_tile_off, mask=tile_ok, other=0.0).to(ACC_TYPE)
    tl.atomic_add(dw_ptr + weight_tile_off, g_total * s_k[:, None] * r_k[None, :], mask=tile_ok, sem="relaxed")
    g_w = g_total * w_tile
    tl.atomic_add(ds_ptr + member * C_out + oc, tl.sum(g_w * r_k[None, :], axis=1), mask=o_ok, sem="relaxed")
    tl.atomic_add(dr_ptr + member * C_in + ci, tl.sum(g_w * s_k[:, None], axis=0), mask=col_ok, sem="relaxed")
    if HYPER:
        d_tile = tl.load(d_ptr + weight_tile_off, mask=tile_ok, other=0.0).to(ACC_TYPE)
        tl.atomic_add(dd_ptr + weight_tile_off, g_delta * v_k[:, None] * u_k[None, :], mask=tile_ok, sem="relaxed")
        g_d = g_delta * d_tile
        tl.atomic_add(dv_ptr + member * C_out + oc, tl.sum(g_d * u_k[None, :], axis=1), mask=o_ok, sem="relaxed")
        tl.atomic_add(du_ptr + member * C_in + ci, tl.sum(g_d * v_k[:, None], axis=0), mask=col_ok, sem="relaxed")


_TUNING_KEY = ["B", "H", "W", "Ho", "Wo", "CG_IN", "CG_OUT", "KH", "KW", "SH", "SW", "DOT_PRECISION", "ALIGNED"]
_WEIGHT_GRAD_OUTPUTS = ["dw_ptr", "dr_ptr", "ds_ptr", "dd_ptr", "du_ptr", "dv_ptr", "de1_ptr"]


def _autotuned(kernel_fn, kernel: str, hyper: bool, tensor_arg: str, **kwargs):
    return triton.autotune([c for c, _ in _CONFIGS[(kernel, hyper)]], key=list(_TUNING_KEY),
                           prune_configs_by={"early_config_prune": _pruner(kernel, hyper, tensor_arg)},
                           **kwargs)(kernel_fn)


_forward = _autotuned(_rank1_conv2d_forward_kernel, "forward", False, "x_ptr")
_hyper_forward = _autotuned(_rank1_conv2d_forward_kernel, "forward", True, "x_ptr")
_input_grad = _autotuned(_rank1_conv2d_input_grad_kernel, "input_grad", False, "g_ptr")
_hyper_input_grad = _autotuned(_rank1_conv2d_input_grad_kernel, "input_grad", True, "g_ptr")
_weight_grad = _autotuned(_rank1_conv2d_weight_grad_kernel, "weight_grad", False, "x_ptr",
                          pre_hook=zero_present(_WEIGHT_GRAD_OUTPUTS))
_hyper_weight_grad = _autotuned(_rank1_conv2d_weight_grad_kernel, "weight_grad", True, "x_ptr",
                                pre_hook=zero_present(_WEIGHT_GRAD_OUTPUTS))


# ----------------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------------
def conv2d_output_size(h, w, kh, kw, stride, padding, dilation):
    """(Ho, Wo) of a conv2d (floor mode, as F.conv2d)."""
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weight_layout(w):
    """The forward and weight-gradient kernels take weights channels-last, (C_out, kh, kw, C_in/groups)
    in memory: the forward's [BLOCK_K input channels, BLOCK_N output channels] weight tile is then
    contiguous along K, as tf32 wgmma wants it in shared memory. weight and delta then share strides."""
    return None if w is None else w.contiguous(memory_format=torch.channels_last)


def _transposed_weight_layout(w):
    """The input-gradient kernel takes weights as (kh, kw, C_in/groups, C_out) in memory (viewed with
    the usual (C_out, C_in/groups, kh, kw) shape): its [BLOCK_K output channels, BLOCK_N input
    channels] weight tile is then contiguous along K."""
    return None if w is None else w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def _channels_fast(x) -> bool:
    return x.stride(1) == 1 and x.shape[1] > 1


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def rank1_conv2d_forward(x, weight, r, s, bias, stride, padding, dilation, groups, out,
                         delta=None, u=None, v=None, e1=None, delta_bias=None, e2=None):
    """Write the batch (or, with delta given, hyper-batch) ensemble conv2d of member-major x into out.

    x (E*B, C_in, H, W) and out (E*B, C_out, Ho, Wo) may have any strides; weight/delta are
    (C_out, C_in/groups, kh, kw); r/u (E, C_in), s/v/bias/delta_bias (E, C_out) and e1/e2
    (E*B, C_out) must be contiguous.
    """
    refuse_interpreted_bfloat16(x)
    E = r.shape[0]
    N, C_in, H, W = x.shape
    C_out, cg_in, kh, kw = weight.shape
    Ho, Wo = out.shape[2], out.shape[3]
    B = N // E
    hyper = delta is not None
    weight, delta = _weight_layout(weight), _weight_layout(delta)
    kernel = _hyper_forward if hyper else _forward
    if out.numel() == 0:
        return out

    def grid(meta):
        return (E * triton.cdiv(B * Ho * Wo, meta["BLOCK_M"]), triton.cdiv(C_out // groups, meta["BLOCK_N"]), groups)

    tensors = (x, weight, r, s, bias, delta, u, v, e1, delta_bias, e2, out)
    ints = (C_in, C_out, cg_in, C_out // groups, *x.stride(), *weight.stride(), *out.stride())
    kernel[grid](
        *tensors,
        B, H, W, Ho, Wo, C_in, C_out, cg_in, C_out // groups,
        kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x.stride(), *weight.stride(), *out.stride(),
        HYPER=hyper, HAS_BIAS=bias is not None, HAS_DELTA_BIAS=delta_bias is not None,
        ACC_FP64=x.dtype == torch.float64, DOT_PRECISION=_dot_precision(x.dtype), ALIGNED=_aligned(tensors, ints),
    )
    return out


def rank1_conv2d_input_grad(grad, weight, r, s, stride, padding, dilation, groups, dx,
                            delta=None, u=None, v=None, e1=None):
    """Write the gradient wrt member-major x into dx (any strides); grad (E*B, C_out, Ho, Wo) any strides."""
    refuse_interpreted_bfloat16(grad)
    E = r.shape[0]
    N, C_in, H, W = dx.shape
    C_out, cg_in, kh, kw = weight.shape
    Ho, Wo = grad.shape[2], grad.shape[3]
    B = N // E
    hyper = delta is not None
    weight, delta = _transposed_weight_layout(weight), _transposed_weight_layout(delta)
    kernel = _hyper_input_grad if hyper else _input_grad
    if dx.numel() == 0 or grad.numel() == 0:
        return dx.zero_()
    sh, sw = stride
    step_h = sh // math.gcd(sh, dilation[0])
    step_w = sw // math.gcd(sw, dilation[1])
    largest_phase = triton.cdiv(H, sh) * triton.cdiv(W, sw) * B

    def grid(meta):
        return (E * triton.cdiv(largest_phase, meta["BLOCK_M"]), triton.cdiv(cg_in, meta["BLOCK_N"]), sh * sw * groups)

    tensors = (grad, weight, r, s, delta, u, v, e1, dx)
    ints = (C_in, C_out, cg_in, C_out // groups, *grad.stride(), *weight.stride(), *dx.stride())
    kernel[grid](
        *tensors,
        B, H, W, Ho, Wo, C_in, C_out, cg_in, C_out // groups,
        kh, kw, sh, sw, padding[0], padding[1], dilation[0], dilation[1], step_h, step_w,
        *grad.stride(), *weight.stride(), *dx.stride(),
        HYPER=hyper, ACC_FP64=dx.dtype == torch.float64, DOT_PRECISION=_dot_precision(dx.dtype),
        ALIGNED=_aligned(tensors, ints),
    )
    return dx


def _pixels_per_program(E, B, Ho, Wo, cg_out, columns, groups, hyper, device):
    """Split each member's pixels so that the grid has about 2 programs per SM (at 64x64 tiles),
    with at least 256 pixels per program; the hyper op rounds to whole images when they are small."""
    pixels = B * Ho * Wo
    tiles = triton.cdiv(cg_out, 64) * triton.cdiv(columns, 64) * groups * E
    splits = max(1, min(triton.cdiv(pixels, 256), triton.cdiv(2 * _num_sms(device), tiles)))
    per_program = triton.cdiv(pixels, splits)
    howo = Ho * Wo
    if hyper and howo < per_program:
        per_program = triton.cdiv(per_program, howo) * howo
    else:
        per_program = triton.cdiv(per_program, 32) * 32
    return per_program, triton.cdiv(pixels, per_program)


def rank1_conv2d_weight_grad(grad, x, weight, r, s, stride, padding, dilation, groups,
                             delta=None, u=None, v=None, e1=None):
    """Gradients wrt weight, r, s (and delta, u, v, e1 for the hyper op), in the accumulator dtype
    (float32, or float64 for float64 inputs): a dict with keys "weight", "r", "s" (and "delta", "u",
    "v", "e1"). weight / delta gradients come back channels-last."""
    refuse_interpreted_bfloat16(grad)
    E = r.shape[0]
    N, C_in, H, W = x.shape
    C_out, cg_in, kh, kw = weight.shape
    Ho, Wo = grad.shape[2], grad.shape[3]
    B = N // E
    hyper = delta is not None
    weight, delta = _weight_layout(weight), _weight_layout(delta)
    acc = accumulator_dtype(x.dtype)

    def zeros_like(t):
        return None if t is None else torch.zeros_like(t, dtype=acc)  # keeps weight's channels-last strides

    grads = {"weight": zeros_like(weight), "r": zeros_like(r), "s": zeros_like(s)}
    if hyper:
        grads.update(delta=zeros_like(delta), u=zeros_like(u), v=zeros_like(v), e1=zeros_like(e1))
    kernel = _hyper_weight_grad if hyper else _weight_grad
    if grad.numel() == 0 or x.numel() == 0:
        return grads
    cg_out = C_out // groups
    columns = cg_in * kh * kw
    per_program, splits = _pixels_per_program(E, B, Ho, Wo, cg_out, columns, groups, hyper, x.device)

    def grid(meta):
        return (triton.cdiv(cg_out, meta["BLOCK_M"]) * triton.cdiv(columns, meta["BLOCK_N"]), E * splits, groups)

    tensors = (grad, x, weight, r, s, delta, u, v, e1, grads["weight"], grads["r"], grads["s"], grads.get("delta"),
               grads.get("u"), grads.get("v"), grads.get("e1"))
    ints = (C_in, C_out, cg_in, cg_out, *grad.stride(), *x.stride(), *weight.stride())
    kernel[grid](
        *tensors,
        B, H, W, Ho, Wo, C_in, C_out, cg_in, cg_out,
        kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        per_program, splits,
        *grad.stride(), *x.stride(), *weight.stride(),
        HYPER=hyper, CHANNELS_FAST=_channels_fast(x), ACC_FP64=x.dtype == torch.float64,
        DOT_PRECISION=_dot_precision(x.dtype), ALIGNED=_aligned(tensors, ints),
    )
    return grads


# ----------------------------------------------------------------------------------------------
# sm_90 compile specs (bench/static_gpu_report.py)
# ----------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
_KERNEL_FNS = {"forward": _rank1_conv2d_forward_kernel, "input_grad": _rank1_conv2d_input_grad_kernel,
               "weight_grad": _rank1_conv2d_weight_grad_kernel}
# strides that are 1 in the fast layouts the ops pass (channels-last activations; weights (C_out, kh, kw,
# C_in) for the forward and weight gradient, (kh, kw, C_in, C_out) for the input gradient)
_UNIT_STRIDES = {"forward": ("sxc", "swc", "syc"), "input_grad": ("sgc", "swo", "sdc"),
                 "weight_grad": ("sgc", "sxc", "swc")}
# ints without a multiple-of-16 guarantee (channel counts and strides are taken as multiples of 16)
_NOT_DIVISIBLE = ("B", "H", "W", "Ho", "Wo", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "STEP_H", "STEP_W",
                  "PIXELS_PER_PROGRAM", "SPLITS")
_ACCUMULATOR_POINTERS = ("dw_ptr", "dr_ptr", "ds_ptr", "dd_ptr", "du_ptr", "dv_ptr", "de1_ptr")
_HYPER_ONLY_POINTERS = ("d_ptr", "u_ptr", "v_ptr", "e1_ptr", "db_ptr", "e2_ptr", "dd_ptr", "du_ptr", "dv_ptr",
                        "de1_ptr")


def sm90_signature(fn, pointer_dtypes: dict, unit_args=(), constexprs=None, not_divisible=()):
    """(signature, constexprs, attrs) for triton.compile(ASTSource(...)) as a launch specialises:
    arguments in unit_args become the constant 1, pointers and the other ints carry
    tt.divisibility=16 except the ints in not_divisible."""
    consts = dict(constexprs or {})
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in unit_args:
            signature[name] = "constexpr"
            consts[name] = 1
        elif name in pointer_dtypes:
            signature[name] = "*" + pointer_dtypes[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name not in not_divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def sm90_compile_specs() -> list:
    """Every kernel of this module at every config it can launch with on an H100, per input dtype
    (bf16, fp32 as tf32 and as tf32x3, fp64; fp16 launches the bf16 configs with the same code and
    register use, and is left out to keep the CI compile time down), for the batch and the hyper op with all optional
    terms on (bias, delta_bias/e2), channels-last activations (unit channel strides, as the ops pass
    them), stride / padding / dilation as runtime ints; aligned configs with 16-divisible channel
    counts and strides and 16-byte aligned pointers, "/u" configs with no divisibility at all (their
    worst case). Keys: name, fn, signature, constexprs, attrs, num_warps, num_stages, dtype, gemm,
    expect_hgmma, config."""
    precisions = ((torch.bfloat16, "ieee"), (torch.float32, "tf32"), (torch.float32, "tf32x3"),
                  (torch.float64, "ieee"))
    specs = []
    for dtype, precision in precisions:
        elem = _TRITON_DTYPE[dtype]
        acc = "fp64" if dtype == torch.float64 else "fp32"
        dtype_name = elem if dtype != torch.float32 else f"fp32/{precision}"
        for kernel, fn in _KERNEL_FNS.items():
            for hyper in (False, True):
                for aligned in (True, False):
                    features = dict(HYPER=hyper, ACC_FP64=dtype == torch.float64, DOT_PRECISION=precision,
                                    ALIGNED=aligned)
                    if kernel == "forward":
                        features.update(HAS_BIAS=True, HAS_DELTA_BIAS=hyper)
                    if kernel == "weight_grad":
                        features.update(CHANNELS_FAST=True)
                    if not hyper:
                        features.update({a: None for a in _HYPER_ONLY_POINTERS if a in fn.arg_names})
                    pointers = {a: (acc if a in _ACCUMULATOR_POINTERS else elem)
                                for a in fn.arg_names if a.endswith("_ptr") and a not in features}
                    cls = _tile_class(dtype, precision, aligned)
                    for cfg in (_config(t) for t in _TILES[(kernel, hyper)] if cls in t[5]):  # GPU tables
                        consts = dict(features, **cfg.kwargs)
                        not_divisible = _NOT_DIVISIBLE if aligned else tuple(fn.arg_names)
                        signature, consts, attrs = sm90_signature(fn, pointers, _UNIT_STRIDES[kernel], consts,
                                                                  not_divisible)
                        if not aligned:
                            attrs = {}  # no pointer alignment either
                        kw = cfg.kwargs
                        specs.append(dict(
                            name=f"rank1_conv2d_{kernel}[{'hyper' if hyper else 'batch'}]", fn=fn,
                            signature=signature, constexprs=consts, attrs=attrs, num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages, dtype=dtype_name + ("" if aligned else " unaligned"),
                            gemm=True, expect_hgmma=dtype != torch.float64,
                            config=f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps} "
                                   f"s{cfg.num_stages}"))
    return specs
