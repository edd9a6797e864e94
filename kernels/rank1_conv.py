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

Kernels assume validated input (hyperkern.ops._validate.validate_conv2d): weight/delta and the small
per-member vectors contiguous, x / grad / outputs with any strides. The bias gradients (sums of the
gradient over pixels) are formed by the caller. fp64 inputs run the same kernels with float64
accumulators and IEEE dots. `sm90_compile_specs()` lists every kernel x config x dtype for the static
sm_90 compile check (bench/static_gpu_report.py).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["rank1_conv2d_forward", "rank1_conv2d_input_grad", "rank1_conv2d_weight_grad", "sm90_compile_specs",
           "conv2d_output_size"]

# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
_SHARED_MEMORY_BYTES = 227 * 1024  # H100 (sm_90) opt-in shared memory per block


def _config(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


if INTERPRETING:  # the interpreter runs one config (blocks >= 16 for tl.dot)
    _FORWARD_CONFIGS = _HYPER_FORWARD_CONFIGS = [_config(16, 16, 16, 4, 1)]
    _INPUT_GRAD_CONFIGS = _HYPER_INPUT_GRAD_CONFIGS = [_config(16, 16, 16, 4, 1)]
    _WEIGHT_GRAD_CONFIGS = _HYPER_WEIGHT_GRAD_CONFIGS = [_config(16, 16, 16, 4, 1)]
else:  # H100: bf16 / tf32 tensor cores (wgmma needs BLOCK_M % 64 == 0 with 4 warps per 64 rows)
    _FORWARD_CONFIGS = [
        _config(128, 128, 32, 8, 3),
        _config(128, 128, 64, 8, 3),
        _config(128, 64, 32, 4, 4),
        _config(128, 64, 64, 8, 3),
        _config(64, 128, 32, 4, 4),
        _config(64, 64, 64, 4, 4),
        _config(64, 64, 32, 4, 3),
    ]
    _HYPER_FORWARD_CONFIGS = [  # two accumulators and two weight tiles
        _config(128, 64, 32, 8, 3),
        _config(128, 128, 32, 8, 3),
        _config(64, 128, 32, 4, 3),
        _config(64, 64, 64, 4, 4),
        _config(64, 64, 32, 4, 3),
    ]
    _INPUT_GRAD_CONFIGS = list(_FORWARD_CONFIGS)
    _HYPER_INPUT_GRAD_CONFIGS = list(_HYPER_FORWARD_CONFIGS)
    _WEIGHT_GRAD_CONFIGS = [  # M = output channels, N = (c, i, j), K = pixels
        _config(128, 128, 32, 8, 3),
        _config(128, 64, 64, 8, 3),
        _config(64, 128, 64, 4, 3),
        _config(64, 64, 64, 4, 4),
        _config(64, 64, 32, 4, 3),
    ]
    _HYPER_WEIGHT_GRAD_CONFIGS = [  # three [BM, BN] fp32 register tiles (G, G_total, GD)
        _config(64, 64, 64, 4, 4),
        _config(64, 64, 32, 4, 3),
        _config(128, 64, 32, 8, 3),
        _config(64, 128, 32, 8, 3),
    ]


def _shared_memory_bytes(config: triton.Config, elem_bytes: int, b_tiles: int) -> int:
    """Pipelined operand buffers: stages x (A tile [BM, BK] + b_tiles x B tile [BK, BN])."""
    kw = config.kwargs
    per_stage = kw["BLOCK_M"] * kw["BLOCK_K"] + b_tiles * kw["BLOCK_K"] * kw["BLOCK_N"]
    return config.num_stages * per_stage * elem_bytes


def _prune_for(b_tiles: int):
    def prune(configs, named_args, **kwargs):
        elem = named_args["x_ptr"].element_size() if "x_ptr" in named_args else named_args["g_ptr"].element_size()
        kept = [c for c in configs if _shared_memory_bytes(c, elem, b_tiles) <= _SHARED_MEMORY_BYTES]
        return kept or configs[-1:]

    return prune


def _configs_for(configs, elem_bytes: int, b_tiles: int):
    return [c for c in configs if _shared_memory_bytes(c, elem_bytes, b_tiles) <= _SHARED_MEMORY_BYTES] or configs[-1:]


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
    ACC_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    HYPER: tl.constexpr, ACC_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
            tl.atomic_add(de1_ptr + n * C_out + oc, de1, mask=o_ok)
        seg_start = seg_end

    s_k = tl.load(s_ptr + member * C_out + oc, mask=o_ok, other=0.0).to(ACC_TYPE)
    r_k = tl.load(r_ptr + member * C_in + ci, mask=col_ok, other=0.0).to(ACC_TYPE)
    w_tile = tl.load(w_ptr + weight_tile_off, mask=tile_ok, other=0.0).to(ACC_TYPE)
    tl.atomic_add(dw_ptr + weight_tile_off, g_total * s_k[:, None] * r_k[None, :], mask=tile_ok)
    g_w = g_total * w_tile
    tl.atomic_add(ds_ptr + member * C_out + oc, tl.sum(g_w * r_k[None, :], axis=1), mask=o_ok)
    tl.atomic_add(dr_ptr + member * C_in + ci, tl.sum(g_w * s_k[:, None], axis=0), mask=col_ok)
    if HYPER:
        d_tile = tl.load(d_ptr + weight_tile_off, mask=tile_ok, other=0.0).to(ACC_TYPE)
        tl.atomic_add(dd_ptr + weight_tile_off, g_delta * v_k[:, None] * u_k[None, :], mask=tile_ok)
        g_d = g_delta * d_tile
        tl.atomic_add(dv_ptr + member * C_out + oc, tl.sum(g_d * u_k[None, :], axis=1), mask=o_ok)
        tl.atomic_add(du_ptr + member * C_in + ci, tl.sum(g_d * v_k[:, None], axis=0), mask=col_ok)


def _forward_key_args():
    return ["B", "Ho", "Wo", "CG_IN", "CG_OUT", "KH", "KW", "SH", "SW"]


_forward = triton.autotune(_FORWARD_CONFIGS, key=_forward_key_args(),
                           prune_configs_by={"early_config_prune": _prune_for(1)})(_rank1_conv2d_forward_kernel)
_hyper_forward = triton.autotune(_HYPER_FORWARD_CONFIGS, key=_forward_key_args(),
                                 prune_configs_by={"early_config_prune": _prune_for(2)})(_rank1_conv2d_forward_kernel)
_input_grad = triton.autotune(_INPUT_GRAD_CONFIGS, key=_forward_key_args() + ["H", "W"],
                              prune_configs_by={"early_config_prune": _prune_for(1)})(_rank1_conv2d_input_grad_kernel)
_hyper_input_grad = triton.autotune(_HYPER_INPUT_GRAD_CONFIGS, key=_forward_key_args() + ["H", "W"],
                                    prune_configs_by={"early_config_prune": _prune_for(2)})(
                                        _rank1_conv2d_input_grad_kernel)
_WEIGHT_GRAD_OUTPUTS = ["dw_ptr", "dr_ptr", "ds_ptr", "dd_ptr", "du_ptr", "dv_ptr", "de1_ptr"]
_weight_grad = triton.autotune(_WEIGHT_GRAD_CONFIGS, key=_forward_key_args() + ["PIXELS_PER_PROGRAM"],
                               reset_to_zero=_WEIGHT_GRAD_OUTPUTS,
                               prune_configs_by={"early_config_prune": _prune_for(1)})(_rank1_conv2d_weight_grad_kernel)
_hyper_weight_grad = triton.autotune(_HYPER_WEIGHT_GRAD_CONFIGS, key=_forward_key_args() + ["PIXELS_PER_PROGRAM"],
                                     reset_to_zero=_WEIGHT_GRAD_OUTPUTS,
                                     prune_configs_by={"early_config_prune": _prune_for(1)})(
                                         _rank1_conv2d_weight_grad_kernel)


# ----------------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------------
def conv2d_output_size(h, w, kh, kw, stride, padding, dilation):
    """(Ho, Wo) of a conv2d (floor mode, as F.conv2d)."""
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


def _dot_precision(dtype: torch.dtype) -> str:
    """tf32 for float32 when cuDNN convolutions may use it (torch's default), else IEEE."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weight_layout(w):
    """Weights go to the kernels channels-last, (C_out, kh, kw, C_in/groups) in memory, so a tile's
    input channels are contiguous (vector loads); weight and delta then share strides."""
    return None if w is None else w.contiguous(memory_format=torch.channels_last)


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
    E = r.shape[0]
    N, C_in, H, W = x.shape
    C_out, cg_in, kh, kw = weight.shape
    Ho, Wo = out.shape[2], out.shape[3]
    B = N // E
    hyper = delta is not None
    weight, delta = _weight_layout(weight), _weight_layout(delta)
    kernel = _hyper_forward if hyper else _forward

    def grid(meta):
        return (E * triton.cdiv(B * Ho * Wo, meta["BLOCK_M"]), triton.cdiv(C_out // groups, meta["BLOCK_N"]), groups)

    kernel[grid](
        x, weight, r, s, bias,
        delta, u, v, e1, delta_bias, e2,
        out,
        B, H, W, Ho, Wo, C_in, C_out, cg_in, C_out // groups,
        kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x.stride(), *weight.stride(), *out.stride(),
        HYPER=hyper, HAS_BIAS=bias is not None, HAS_DELTA_BIAS=delta_bias is not None,
        ACC_FP64=x.dtype == torch.float64, DOT_PRECISION=_dot_precision(x.dtype),
    )
    return out


def rank1_conv2d_input_grad(grad, weight, r, s, stride, padding, dilation, groups, dx,
                            delta=None, u=None, v=None, e1=None):
    """Write the gradient wrt member-major x into dx (any strides); grad (E*B, C_out, Ho, Wo) any strides."""
    E = r.shape[0]
    N, C_in, H, W = dx.shape
    C_out, cg_in, kh, kw = weight.shape
    Ho, Wo = grad.shape[2], grad.shape[3]
    B = N // E
    hyper = delta is not None
    weight, delta = _weight_layout(weight), _weight_layout(delta)
    kernel = _hyper_input_grad if hyper else _input_grad
    sh, sw = stride
    step_h = sh // math.gcd(sh, dilation[0])
    step_w = sw // math.gcd(sw, dilation[1])
    largest_phase = triton.cdiv(H, sh) * triton.cdiv(W, sw) * B

    def grid(meta):
        return (E * triton.cdiv(largest_phase, meta["BLOCK_M"]), triton.cdiv(cg_in, meta["BLOCK_N"]), sh * sw * groups)

    kernel[grid](
        grad, weight, r, s,
        delta, u, v, e1,
        dx,
        B, H, W, Ho, Wo, C_in, C_out, cg_in, C_out // groups,
        kh, kw, sh, sw, padding[0], padding[1], dilation[0], dilation[1], step_h, step_w,
        *grad.stride(), *weight.stride(), *dx.stride(),
        HYPER=hyper, ACC_FP64=dx.dtype == torch.float64, DOT_PRECISION=_dot_precision(dx.dtype),
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
    cg_out = C_out // groups
    columns = cg_in * kh * kw
    per_program, splits = _pixels_per_program(E, B, Ho, Wo, cg_out, columns, groups, hyper, x.device)

    def grid(meta):
        return (triton.cdiv(cg_out, meta["BLOCK_M"]) * triton.cdiv(columns, meta["BLOCK_N"]), E * splits, groups)

    kernel[grid](
        grad, x, weight, r, s,
        delta, u, v, e1,
        grads["weight"], grads["r"], grads["s"], grads.get("delta"), grads.get("u"), grads.get("v"), grads.get("e1"),
        B, H, W, Ho, Wo, C_in, C_out, cg_in, cg_out,
        kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        per_program, splits,
        *grad.stride(), *x.stride(), *weight.stride(),
        HYPER=hyper, CHANNELS_FAST=_channels_fast(x), ACC_FP64=x.dtype == torch.float64,
        DOT_PRECISION=_dot_precision(x.dtype),
    )
    return grads
