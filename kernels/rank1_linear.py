"""Triton kernels for the rank-1 ensemble linear ops (installed as hyperkern.kernels.rank1_linear).

Rows are member-major: x has E*B rows and rows k*B .. (k+1)*B-1 belong to ensemble member k.
Weights use the nn.Linear layout (out, in). The ops computed here (docs/method.md §1-2):

    batch:  y = s_k * ((x * r_k) @ W^T) + b_k
    hyper:  y = s_k * ((x * r_k) @ W^T) + (v_k * e1) * ((x * u_k) @ Delta^T) + b_k + b'_k * e2

Pure @triton.jit code plus launch helpers; no autograd (hyperkern/ops/_triton_linear.py wraps these
launchers in torch.library custom ops). Every pass is one launch for all members:

- forward (`rank1_linear_forward_kernel`): grid over (row tiles, out tiles); a row tile never crosses a
  member boundary (tiles are numbered per member, so B need not be a multiple of BLOCK_M). The x tile
  is scaled by r_k (and u_k) in registers before tl.dot; W (and Delta) products accumulate in fp32
  (fp64 for fp64 inputs) in one K loop -- the hyper op keeps two accumulators that share the x tile
  loads -- and the epilogue applies s_k, v_k * e1, b_k, b'_k * e2 and stores in the output dtype.
  It can also store the pre-scale Delta product (x * u_k) @ Delta^T, which the e1 gradient needs.
- grad input (`rank1_linear_grad_input_kernel`): dx = ((g * s_k) @ W) * r_k [+ ((g * v_k * e1) @ Delta) * u_k],
  the g scaling fused into the A-operand loads and the r_k / u_k scaling into the epilogue.
- grad weight (`rank1_linear_grad_weight_kernel`): grid over (out tiles, in tiles), K loop over rows,
  member by member. P_k = g_k^T x_k (unscaled) accumulates per member; at each member's end
      dW   += P_k * (s_k r_k^T)
      ds_k  = rowsum(W * P_k * r_k)      (= sum over member rows of g * ((x * r_k) @ W^T))
      dr_k  = colsum(W * P_k * s_k)      (= sum over member rows of x * ((g * s_k) @ W))
  so ds and dr come out of the weight-gradient GEMM without a second pass over the activations. For
  the hyper op the same launch has a second program row (grid axis 1) that does this for Delta with
  Q_k = (g * e1)_k^T x_k and (v_k, u_k): dDelta, dv, du. ds/dr (dv/du) are written as per-tile
  partial sums (deterministic, no atomics) that the launcher sums over the few tiles.
- grad row-wise (`rank1_linear_grad_rowwise_kernel`): db_k = sum of g over member rows,
  db'_k = sum of g * e2, de1 = g * v_k * hd, de2 = g * b'_k, in one pass over g.

EMBED mode (the hyper op with e(lambda) inside, hyperkern.ops.hyper_batch_ensemble_linear_hp): the
kernels take the rows' hyperparameters hp (E*B, M) and the transposed embedding weight embT (M, OUT
or 2*OUT) instead of e1 / e2 and compute [e1 | e2] = hp @ embT per tile with M outer products
(`_embed_tile`): the forward in its epilogue, grad input and grad weight in their K loops (the e1
tile that scales g). The row-wise kernel then stores no de1 / de2 but reduces them in registers into
per-tile partials of d(embedding) (sums over the tile's rows of de_j * hp_p) and d(hparams) (sums
over the tile's columns of de_j * embT[p, j]) that its launcher sums. M is a constexpr (the M loop
inside a K loop must be unrolled for Triton to pipeline that loop), so each number of
hyperparameters compiles its own kernels. No (E*B, OUT) tensor of e or of its gradient is made.

Data types: bfloat16, float16 (fp32 accumulation), float32 (TF32 tensor cores: tl.dot
input_precision "tf32" or "tf32x3" per torch.get_float32_matmul_precision(), see dot_precision())
and float64. float64 has a dedicated path, not a fallback: tl.dot accepts fp64 operands (DMMA on
sm_90, checked by the static report) with an fp64 accumulator, so the same kernels run with
ACC_DTYPE = fp64 and fp64-sized tiles.

`sm90_compile_specs()` lists every (kernel, dtype, constexprs, config) this module can launch on an
H100, for bench/static_gpu_report.py.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import refuse_interpreted_bfloat16, zero_present

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Row-wise (bias / embedding gradient) tiles are fixed, so the launcher knows the partial-sum layout.
ROWWISE_BLOCK_M = 16 if INTERPRET else 32
ROWWISE_BLOCK_N = 32 if INTERPRET else 128


def rowwise_block_n(dtype: torch.dtype, embed: bool) -> int:
    """Column tile of the row-wise kernel: half width for the fp64 EMBED pass, which holds de1 and g
    (fp64, two registers each) through its d(embedding) / d(hparams) reductions (the full width spilled
    on sm_90 for some m)."""
    return ROWWISE_BLOCK_N // 2 if (embed and dtype == torch.float64) else ROWWISE_BLOCK_N


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a 1-D program id to (pid_m, pid_n), walking GROUP_M row tiles per column sweep (L2 reuse)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _embed_tile(a_ptrs, a_mask, a_step, b_ptrs, b_mask, b_step, M: tl.constexpr,
                ACC_DTYPE: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, UNROLL: tl.constexpr):
    """sum over p < M of outer(a[p], b[p]) in ACC_DTYPE, (BLOCK_A, BLOCK_B): a[p] is loaded from
    a_ptrs + p * a_step, b[p] from b_ptrs + p * b_step (masked lanes are 0). The EMBED grad input and grad
    weight kernels get their e1 tiles (the row-wise kernel its e2 tile) this way from the rows'
    hyperparameters hp (E*B, M) and the transposed embedding embT (M, OUT or 2*OUT): e[i, j] =
    sum_p hp[i, p] * embT[p, j], M FMAs per element (M, the number of hyperparameters, is a handful). UNROLL (inside the GEMM kernels' K loops): the M steps are unrolled, M being a
    constexpr; a run-time loop nested in a K loop stops Triton from software-pipelining it (seen in the
    sm_90 builds: no multi-stage buffers, spills). Outside a K loop a run-time loop keeps one step's
    operands live at a time."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC_DTYPE)
    if UNROLL:
        for p in tl.static_range(M):
            a = tl.load(a_ptrs + p * a_step, mask=a_mask, other=0.0).to(ACC_DTYPE)
            b = tl.load(b_ptrs + p * b_step, mask=b_mask, other=0.0).to(ACC_DTYPE)
            acc += a[:, None] * b[None, :]
    else:
        for p in range(0, M):
            a = tl.load(a_ptrs + p * a_step, mask=a_mask, other=0.0).to(ACC_DTYPE)
            b = tl.load(b_ptrs + p * b_step, mask=b_mask, other=0.0).to(ACC_DTYPE)
            acc += a[:, None] * b[None, :]
    return acc


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def rank1_linear_forward_kernel(
        x_ptr, w_ptr, r_ptr, s_ptr, bias_ptr,
        delta_ptr, u_ptr, v_ptr, e1_ptr, delta_bias_ptr, e2_ptr, hp_ptr, embt_ptr,
        y_ptr, delta_out_ptr,
        E, B, IN, OUT,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_dn, stride_dk,
        stride_e1m, stride_e1n, stride_e2m, stride_e2n, stride_hm, stride_et,
        HAS_BIAS: tl.constexpr, HYPER: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, EMBED: tl.constexpr,
        M: tl.constexpr, STORE_DELTA_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
        ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    """y (E*B, OUT), contiguous. r, s, bias, u, v, delta_bias: contiguous (E, IN|OUT).
    delta_out (E*B, OUT) contiguous receives (x * u_k) @ Delta^T when STORE_DELTA_OUT.
    EMBED (hyper op): e1 / e2 are not read but computed in the epilogue from hp (E*B, M; row stride
    stride_hm, unit inner stride) and embT (M, OUT or 2*OUT; row stride stride_et, unit inner stride):
    e1 = hp @ embT[:, :OUT], e2 = hp @ embT[:, OUT:], folded into y one hyperparameter at a time;
    e1_ptr / e2_ptr are unused.
    ALIGNED (here and in the other GEMM kernels) is the launcher's layout class (see
    operand_layout_aligned); the code is the same, it keys the autotuner's tile table."""
    tiles_per_member = tl.cdiv(B, BLOCK_M)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), E * tiles_per_member, tl.cdiv(OUT, BLOCK_N), GROUP_M)
    member = pid_m // tiles_per_member
    row0 = (pid_m - member * tiles_per_member) * BLOCK_M  # first row of this tile inside its member
    first_row = (member * B + row0).to(tl.int64)
    first_col = pid_n * BLOCK_N

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = (row0 + offs_m) < B
    col_mask = (first_col + offs_n) < OUT

    x_ptrs = x_ptr + first_row * stride_xm + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # W^T tile (BLOCK_K, BLOCK_N): element [k, n] = W[first_col + n, k]
    wt_ptrs = w_ptr + first_col.to(tl.int64) * stride_wn + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    r_ptrs = r_ptr + member * IN + offs_k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if HYPER:
        dt_ptrs = (delta_ptr + first_col.to(tl.int64) * stride_dn + offs_n[None, :] * stride_dn
                   + offs_k[:, None] * stride_dk)
        u_ptrs = u_ptr + member * IN + offs_k
        acc_delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)

    for k0 in range(0, IN, BLOCK_K):
        k_mask = (k0 + offs_k) < IN
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        r = tl.load(r_ptrs, mask=k_mask, other=0.0)
        wt = tl.load(wt_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(x * r[None, :], wt, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if HYPER:
            u = tl.load(u_ptrs, mask=k_mask, other=0.0)
            dt = tl.load(dt_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc_delta = tl.dot(x * u[None, :], dt, acc_delta, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            u_ptrs += BLOCK_K
            dt_ptrs += BLOCK_K * stride_dk
        x_ptrs += BLOCK_K * stride_xk
        wt_ptrs += BLOCK_K * stride_wk
        r_ptrs += BLOCK_K

    # epilogue: per-member column scales and biases, per-row embeddings
    out_offs = member * OUT + first_col + offs_n
    s = tl.load(s_ptr + out_offs, mask=col_mask, other=0.0).to(ACC_DTYPE)
    y = acc * s[None, :]
    tile_mask = row_mask[:, None] & col_mask[None, :]
    if HYPER:
        v = tl.load(v_ptr + out_offs, mask=col_mask, other=0.0).to(ACC_DTYPE)
        if STORE_DELTA_OUT:
            d_ptrs = delta_out_ptr + first_row * OUT + offs_m[:, None] * OUT + (first_col + offs_n)[None, :]
            tl.store(d_ptrs, acc_delta.to(delta_out_ptr.dtype.element_ty), mask=tile_mask)
        if EMBED:
            # y += (v_k * e1) * hd + b'_k * e2 = sum_p hp[:, p] * (hd * v_k * embT[p, :OUT] + b'_k * embT[p, OUT:])
            # folded into y step by step: no e1 / e2 tile next to the two accumulators
            hd_v = acc_delta * v[None, :]
            hp_rows = hp_ptr + (first_row + offs_m) * stride_hm
            et_ptrs = embt_ptr + first_col + offs_n
            if HAS_DELTA_BIAS:
                db = tl.load(delta_bias_ptr + out_offs, mask=col_mask, other=0.0).to(ACC_DTYPE)
            for p in range(0, M):
                h = tl.load(hp_rows + p, mask=row_mask, other=0.0).to(ACC_DTYPE)
                w1 = tl.load(et_ptrs + p * stride_et, mask=col_mask, other=0.0).to(ACC_DTYPE)
                if HAS_DELTA_BIAS:
                    w2 = tl.load(et_ptrs + p * stride_et + OUT, mask=col_mask, other=0.0).to(ACC_DTYPE)
                    y += h[:, None] * (hd_v * w1[None, :] + (db * w2)[None, :])
                else:
                    y += h[:, None] * (hd_v * w1[None, :])
        else:
            e1 = tl.load(e1_ptr + first_row * stride_e1m + offs_m[:, None] * stride_e1m
                         + (first_col + offs_n)[None, :] * stride_e1n, mask=tile_mask, other=0.0).to(ACC_DTYPE)
            y += acc_delta * v[None, :] * e1
    if HAS_BIAS:
        b = tl.load(bias_ptr + out_offs, mask=col_mask, other=0.0).to(ACC_DTYPE)
        y += b[None, :]
    if HAS_DELTA_BIAS and not EMBED:
        db = tl.load(delta_bias_ptr + out_offs, mask=col_mask, other=0.0).to(ACC_DTYPE)
        e2 = tl.load(e2_ptr + first_row * stride_e2m + offs_m[:, None] * stride_e2m
                     + (first_col + offs_n)[None, :] * stride_e2n, mask=tile_mask, other=0.0).to(ACC_DTYPE)
        y += db[None, :] * e2
    y_ptrs = y_ptr + first_row * OUT + offs_m[:, None] * OUT + (first_col + offs_n)[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=tile_mask)


# ----------------------------------------------------------------------------------------------
# backward: grad input
# ----------------------------------------------------------------------------------------------
@triton.jit
def rank1_linear_grad_input_kernel(
        g_ptr, w_ptr, r_ptr, s_ptr, delta_ptr, u_ptr, v_ptr, e1_ptr, hp_ptr, embt_ptr, dx_ptr,
        E, B, IN, OUT,
        stride_gm, stride_gn, stride_wn, stride_wk, stride_dn, stride_dk, stride_e1m, stride_e1n,
        stride_hm, stride_et,
        HYPER: tl.constexpr, EMBED: tl.constexpr, M: tl.constexpr, DOT_PRECISION: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    """dx (E*B, IN) contiguous = ((g * s_k) @ W) * r_k [+ ((g * v_k * e1) @ Delta) * u_k].
    Here N runs over IN (the columns of dx) and K over OUT. EMBED: each K step's e1 tile is computed
    from hp and embT as in the forward kernel instead of loaded."""
    tiles_per_member = tl.cdiv(B, BLOCK_M)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), E * tiles_per_member, tl.cdiv(IN, BLOCK_N), GROUP_M)
    member = pid_m // tiles_per_member
    row0 = (pid_m - member * tiles_per_member) * BLOCK_M
    first_row = (member * B + row0).to(tl.int64)
    first_col = pid_n * BLOCK_N

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = (row0 + offs_m) < B
    col_mask = (first_col + offs_n) < IN

    g_ptrs = g_ptr + first_row * stride_gm + offs_m[:, None] * stride_gm + offs_k[None, :] * stride_gn
    # W tile (BLOCK_K, BLOCK_N): element [k, n] = W[k, first_col + n]
    w_ptrs = w_ptr + first_col * stride_wk + offs_k[:, None] * stride_wn + offs_n[None, :] * stride_wk
    s_ptrs = s_ptr + member * OUT + offs_k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if HYPER:
        if EMBED:
            hp_rows = hp_ptr + (first_row + offs_m) * stride_hm
            et_ptrs = embt_ptr + offs_k
        else:
            e1_ptrs = e1_ptr + first_row * stride_e1m + offs_m[:, None] * stride_e1m + offs_k[None, :] * stride_e1n
        d_ptrs = delta_ptr + first_col * stride_dk + offs_k[:, None] * stride_dn + offs_n[None, :] * stride_dk
        v_ptrs = v_ptr + member * OUT + offs_k
        acc_delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)

    for k0 in range(0, OUT, BLOCK_K):
        k_mask = (k0 + offs_k) < OUT
        a_mask = row_mask[:, None] & k_mask[None, :]
        b_mask = k_mask[:, None] & col_mask[None, :]
        g = tl.load(g_ptrs, mask=a_mask, other=0.0)
        s = tl.load(s_ptrs, mask=k_mask, other=0.0)
        w = tl.load(w_ptrs, mask=b_mask, other=0.0)
        acc = tl.dot(g * s[None, :], w, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if HYPER:
            if EMBED:
                e1 = _embed_tile(hp_rows, row_mask, 1, et_ptrs, k_mask, stride_et, M, ACC_DTYPE, BLOCK_M,
                                 BLOCK_K, True).to(g.dtype)
                et_ptrs += BLOCK_K
            else:
                e1 = tl.load(e1_ptrs, mask=a_mask, other=0.0)
                e1_ptrs += BLOCK_K * stride_e1n
            v = tl.load(v_ptrs, mask=k_mask, other=0.0)
            d = tl.load(d_ptrs, mask=b_mask, other=0.0)
            acc_delta = tl.dot(g * e1 * v[None, :], d, acc_delta, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            d_ptrs += BLOCK_K * stride_dn
            v_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_gn
        w_ptrs += BLOCK_K * stride_wn
        s_ptrs += BLOCK_K

    in_offs = member * IN + first_col + offs_n
    r = tl.load(r_ptr + in_offs, mask=col_mask, other=0.0).to(ACC_DTYPE)
    dx = acc * r[None, :]
    if HYPER:
        u = tl.load(u_ptr + in_offs, mask=col_mask, other=0.0).to(ACC_DTYPE)
        dx += acc_delta * u[None, :]
    dx_ptrs = dx_ptr + first_row * IN + offs_m[:, None] * IN + (first_col + offs_n)[None, :]
    tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# ----------------------------------------------------------------------------------------------
# backward: grad weight (+ the fast-weight gradients ds, dr / dv, du as fused reductions)
# ----------------------------------------------------------------------------------------------
@triton.jit
def rank1_linear_grad_weight_kernel(
        g_ptr, x_ptr, w_ptr, r_ptr, s_ptr, delta_ptr, u_ptr, v_ptr, e1_ptr, hp_ptr, embt_ptr,
        dw_ptr, ddelta_ptr, ds_part_ptr, dr_part_ptr, dv_part_ptr, du_part_ptr,
        E, B, IN, OUT, n_part_in, n_part_out,
        stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk, stride_dn, stride_dk,
        stride_e1m, stride_e1n, stride_hm, stride_et,
        HYPER: tl.constexpr, EMBED: tl.constexpr, M: tl.constexpr, DOT_PRECISION: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        ALIGNED: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr):
    """Grid (tiles of (OUT, IN), 2 if HYPER else 1). Program axis 1 = 0 computes
    dW (OUT, IN) contiguous = sum_k (g_k * s_k)^T (x_k * r_k) and the partial sums
    ds_part (E, n_part_in, OUT), dr_part (E, n_part_out, IN) (ACC_DTYPE; slot pid_i / pid_o; the
    launcher sums axis 1, unused slots stay zero). Axis 1 = 1 (hyper op) does the same for Delta with
    g * e1 in place of g and (v, u) in place of (s, r): dDelta, dv_part, du_part. EMBED: the e1^T tile
    (BLOCK_O, BLOCK_R) is computed from embT and hp (M outer products; none in the W programs, whose
    tile is all ones) instead of loaded."""
    pid_o, pid_i = _grouped_tile(tl.program_id(0), tl.cdiv(OUT, BLOCK_O), tl.cdiv(IN, BLOCK_I), GROUP_M)
    weight_ptr, scale_o_ptr, scale_i_ptr, grad_ptr = w_ptr, s_ptr, r_ptr, dw_ptr
    part_o_ptr, part_i_ptr, stride_on, stride_ik = ds_part_ptr, dr_part_ptr, stride_wn, stride_wk
    e1_rows = B * tl.program_id(1)  # member rows whose e1 scales g: B for Delta programs, 0 for W programs
    if HYPER:
        if tl.program_id(1) == 1:
            weight_ptr, scale_o_ptr, scale_i_ptr, grad_ptr = delta_ptr, v_ptr, u_ptr, ddelta_ptr
            part_o_ptr, part_i_ptr, stride_on, stride_ik = dv_part_ptr, du_part_ptr, stride_dn, stride_dk

    first_o = pid_o * BLOCK_O
    first_i = pid_i * BLOCK_I
    offs_o = tl.arange(0, BLOCK_O)
    offs_i = tl.arange(0, BLOCK_I)
    offs_r = tl.arange(0, BLOCK_R)
    o_mask = (first_o + offs_o) < OUT
    i_mask = (first_i + offs_i) < IN
    # loop-invariant tile offsets; the row position lives in the scalar base pointers
    gt_offs = offs_r[None, :] * stride_gm + (first_o + offs_o)[:, None] * stride_gn  # g^T tile (BLOCK_O, BLOCK_R)
    x_offs = offs_r[:, None] * stride_xm + (first_i + offs_i)[None, :] * stride_xk   # x tile (BLOCK_R, BLOCK_I)
    if HYPER:
        if EMBED:  # the W programs (axis 1 = 0) load no embedding (masked off) and scale g by ones
            is_delta = tl.program_id(1)
            et_ptrs = embt_ptr + first_o + offs_o
            et_mask = (first_o + offs_o) < OUT * is_delta  # o_mask in the Delta programs, none in the W ones
        else:
            e1t_offs = offs_r[None, :] * stride_e1m + (first_o + offs_o)[:, None] * stride_e1n

    grad = tl.zeros((BLOCK_O, BLOCK_I), dtype=ACC_DTYPE)
    for member in range(0, E):
        first_row = (member * B).to(tl.int64)
        g_base = g_ptr + first_row * stride_gm
        x_base = x_ptr + first_row * stride_xm
        if HYPER:
            if EMBED:
                hp_base = hp_ptr + first_row * stride_hm
            else:
                e1_base = e1_ptr + first_row * stride_e1m
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=ACC_DTYPE)  # P_k = g_k^T x_k (or (g * e1)_k^T x_k)
        for m0 in range(0, B, BLOCK_R):
            m_mask = (m0 + offs_r) < B
            gt = tl.load(g_base + gt_offs, mask=o_mask[:, None] & m_mask[None, :], other=0.0)
            x = tl.load(x_base + x_offs, mask=m_mask[:, None] & i_mask[None, :], other=0.0)
            if HYPER:  # e1 scales g for the Delta programs; the W programs read no e1 rows, only ones
                if EMBED:
                    e1t = _embed_tile(et_ptrs, et_mask, stride_et, hp_base + offs_r * stride_hm, m_mask, 1,
                                      M, ACC_DTYPE, BLOCK_O, BLOCK_R, True) + (1 - is_delta)
                    gt = gt * e1t.to(gt.dtype)
                    hp_base += BLOCK_R * stride_hm
                else:
                    e1_mask = o_mask[:, None] & ((m0 + offs_r) < e1_rows)[None, :]
                    e1t = tl.load(e1_base + e1t_offs, mask=e1_mask, other=1.0)
                    gt = gt * e1t
                    e1_base += BLOCK_R * stride_e1m
            acc = tl.dot(gt, x, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            g_base += BLOCK_R * stride_gm
            x_base += BLOCK_R * stride_xm
        # member epilogue: ds_k, dr_k partials from P_k and the weight tile, then dW += P_k * (s_k r_k^T)
        w = tl.load(weight_ptr + first_o.to(tl.int64) * stride_on + offs_o[:, None] * stride_on
                    + (first_i + offs_i)[None, :] * stride_ik,
                    mask=o_mask[:, None] & i_mask[None, :], other=0.0).to(ACC_DTYPE)
        scale_o = tl.load(scale_o_ptr + member * OUT + first_o + offs_o, mask=o_mask, other=0.0).to(ACC_DTYPE)
        scale_i = tl.load(scale_i_ptr + member * IN + first_i + offs_i, mask=i_mask, other=0.0).to(ACC_DTYPE)
        wp = w * acc
        tl.store(part_o_ptr + (member * n_part_in + pid_i).to(tl.int64) * OUT + first_o + offs_o,
                 tl.sum(wp * scale_i[None, :], axis=1), mask=o_mask)
        tl.store(part_i_ptr + (member * n_part_out + pid_o).to(tl.int64) * IN + first_i + offs_i,
                 tl.sum(wp * scale_o[:, None], axis=0), mask=i_mask)
        grad += acc * scale_o[:, None] * scale_i[None, :]
    out_offs = first_o.to(tl.int64) * IN + offs_o[:, None] * IN + (first_i + offs_i)[None, :]
    tl.store(grad_ptr + out_offs, grad.to(grad_ptr.dtype.element_ty), mask=o_mask[:, None] & i_mask[None, :])


# ----------------------------------------------------------------------------------------------
# backward: row-wise terms (bias sums, embedding gradients)
# ----------------------------------------------------------------------------------------------
@triton.jit
def rank1_linear_grad_rowwise_kernel(
        g_ptr, delta_out_ptr, v_ptr, e2_ptr, delta_bias_ptr, hp_ptr, embt_ptr,
        db_part_ptr, ddb_part_ptr, de1_ptr, de2_ptr, demb_part_ptr, dhp_part_ptr,
        E, B, OUT,
        stride_gm, stride_gn, stride_e2m, stride_e2n, stride_hm, stride_et,
        BIAS_GRAD: tl.constexpr, E1_GRAD: tl.constexpr, DELTA_BIAS_GRAD: tl.constexpr, EMBED: tl.constexpr,
        M: tl.constexpr,
        E2_GRAD: tl.constexpr, EMB_GRAD: tl.constexpr, HP_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (E * cdiv(B, BLOCK_M), cdiv(OUT, BLOCK_N)); row tiles stay inside one member.
    BIAS_GRAD: db_part[tile] = sum of g over the tile's rows (ACC_DTYPE, (E*T, OUT)).
    E1_GRAD: de1 = g * v_k * delta_out (delta_out = (x * u_k) @ Delta^T, contiguous (E*B, OUT)).
    DELTA_BIAS_GRAD: ddb_part[tile] = sum of g * e2 over the tile's rows; de2 = g * delta_bias_k.
    de1, de2 are contiguous (E*B, OUT).

    EMBED (hp (E*B, M) and embT (M, OUT or 2*OUT) as in the forward kernel): no de1 / de2 is stored.
    DELTA_BIAS_GRAD computes its e2 tile in-kernel. E1_GRAD forms de1 = g * v_k * delta_out in
    registers, with E2_GRAD also de2 = g * delta_bias_k (the e2 columns), and reduces them into
    EMB_GRAD: demb_part[tile, p, j] = sum over the tile's rows of de_j * hp_p (ACC_DTYPE,
              (E*T, M, OUT or 2*OUT) contiguous, the de2 columns at OUT + j), and
    HP_GRAD:  dhp_part[pid_n, i, p] = sum over the tile's columns of de1_j * embT[p, j]
              (+ de2_j * embT[p, OUT + j]) (ACC_DTYPE, (cdiv(OUT, BLOCK_N), E*B, M) contiguous);
    the launcher sums the partials over tiles: d(embedding)^T = demb_part.sum(0), d(hparams) =
    dhp_part.sum(0)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles_per_member = tl.cdiv(B, BLOCK_M)
    member = pid_m // tiles_per_member
    row0 = (pid_m - member * tiles_per_member) * BLOCK_M
    first_row = (member * B + row0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = (row0 + offs_m) < B
    col_mask = offs_n < OUT
    mask = row_mask[:, None] & col_mask[None, :]
    g = tl.load(g_ptr + first_row * stride_gm + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                mask=mask, other=0.0).to(ACC_DTYPE)
    if BIAS_GRAD:
        tl.store(db_part_ptr + pid_m.to(tl.int64) * OUT + offs_n, tl.sum(g, axis=0), mask=col_mask)
    contig = first_row * OUT + offs_m[:, None] * OUT + offs_n[None, :]
    if EMBED:
        hp_rows = hp_ptr + (first_row + offs_m) * stride_hm
    if DELTA_BIAS_GRAD and EMBED:  # before de1, so that the e2 tile is dead when de1 is formed
        e2 = _embed_tile(hp_rows, row_mask, 1, embt_ptr + OUT + offs_n, col_mask, stride_et, M, ACC_DTYPE,
                         BLOCK_M, BLOCK_N, False)
        tl.store(ddb_part_ptr + pid_m.to(tl.int64) * OUT + offs_n, tl.sum(g * e2, axis=0), mask=col_mask)
    if E1_GRAD:
        hd = tl.load(delta_out_ptr + contig, mask=mask, other=0.0).to(ACC_DTYPE)
        v = tl.load(v_ptr + member * OUT + offs_n, mask=col_mask, other=0.0).to(ACC_DTYPE)
        de1 = g * v[None, :] * hd
        if not EMBED:
            tl.store(de1_ptr + contig, de1.to(de1_ptr.dtype.element_ty), mask=mask)
    if DELTA_BIAS_GRAD and not EMBED:
        e2 = tl.load(e2_ptr + first_row * stride_e2m + offs_m[:, None] * stride_e2m + offs_n[None, :] * stride_e2n,
                     mask=mask, other=0.0).to(ACC_DTYPE)
        tl.store(ddb_part_ptr + pid_m.to(tl.int64) * OUT + offs_n, tl.sum(g * e2, axis=0), mask=col_mask)
        db = tl.load(delta_bias_ptr + member * OUT + offs_n, mask=col_mask, other=0.0).to(ACC_DTYPE)
        tl.store(de2_ptr + contig, (g * db[None, :]).to(de2_ptr.dtype.element_ty), mask=mask)
    if EMBED and E1_GRAD:  # d(embedding), d(hparams) partials from de1 and de2 = g * b'_k, in registers
        if E2_GRAD:  # de2 is not formed: its sums are b'_k * (sums of g)
            db = tl.load(delta_bias_ptr + member * OUT + offs_n, mask=col_mask, other=0.0).to(ACC_DTYPE)
            out2 = 2 * OUT
        else:
            out2 = OUT
        demb_ptrs = demb_part_ptr + pid_m.to(tl.int64) * M * out2 + offs_n
        dhp_ptrs = dhp_part_ptr + (pid_n.to(tl.int64) * E * B + first_row + offs_m) * M
        for p in range(0, M):
            if EMB_GRAD:
                h = tl.load(hp_rows + p, mask=row_mask, other=0.0).to(ACC_DTYPE)
                tl.store(demb_ptrs + p * out2, tl.sum(de1 * h[:, None], axis=0), mask=col_mask)
                if E2_GRAD:
                    tl.store(demb_ptrs + p * out2 + OUT, db * tl.sum(g * h[:, None], axis=0), mask=col_mask)
            if HP_GRAD:
                w1 = tl.load(embt_ptr + p * stride_et + offs_n, mask=col_mask, other=0.0).to(ACC_DTYPE)
                if E2_GRAD:
                    w2 = tl.load(embt_ptr + p * stride_et + OUT + offs_n, mask=col_mask, other=0.0).to(ACC_DTYPE)
                    t = tl.sum(de1 * w1[None, :] + g * (db * w2)[None, :], axis=1)
                else:
                    t = tl.sum(de1 * w1[None, :], axis=1)
                tl.store(dhp_ptrs + p, t, mask=row_mask)


# ----------------------------------------------------------------------------------------------
# configurations (H100): one table, used by the autotuners and by the static sm_90 report
# ----------------------------------------------------------------------------------------------
# Kernel kinds: "forward" and "grad_input" tile (rows, columns, reduction) as BLOCK_M x BLOCK_N x
# BLOCK_K; "grad_weight" tiles (out, in, rows) as BLOCK_O x BLOCK_I x BLOCK_R.
_KIND_AXES = {"forward": ("BLOCK_M", "BLOCK_N", "BLOCK_K"), "grad_input": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
              "grad_weight": ("BLOCK_O", "BLOCK_I", "BLOCK_R")}

# Tiles (M, N, K, num_warps, num_stages) per (kind, operand class, hyper op, aligned layout).
# Every entry compiles for sm_90 without spills, within shared memory and, except fp64, with HGMMA
# (wgmma): checked by `python -m bench.static_gpu_report --check` in CI; entries that spilled were
# removed (the hyper forward keeps two register A operands next to two accumulators; grad_weight
# keeps the member and the running accumulator plus a weight tile in its per-member epilogue;
# tf32x3 splits operands into hi/lo parts). wgmma needs num_warps a multiple of 4 and 64-row
# warpgroup tiles; fp32 operands use K = 32 so 3-4 stages fit in shared memory; fp64 runs on DMMA.
# Aligned layouts (widths and row strides multiples of 16 elements, 16-byte base pointers) get
# vectorised asynchronous copies and deep pipelines. Unaligned ones (e.g. in_features = 19) can only
# use element-wise loads that go through registers, so they get small tiles and 2 stages.
_ROW_16 = ((128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
           (128, 64, 64, 8, 3), (64, 128, 64, 8, 4))
_ROW_TF32 = ((128, 128, 32, 4, 3), (128, 128, 32, 8, 4), (64, 128, 32, 4, 4), (128, 64, 32, 8, 4),
             (64, 64, 32, 8, 4))
_ROW_TF32X3 = ((128, 128, 32, 8, 4), (64, 128, 32, 4, 4), (128, 64, 32, 8, 4), (64, 64, 32, 8, 4))
_FP64_SMALL = ((32, 32, 32, 4, 2),)
_U_ROW = ((128, 64, 32, 8, 2), (64, 64, 32, 8, 2))  # unaligned, one accumulator
_U_TWO = ((64, 64, 32, 8, 2), (64, 64, 16, 8, 2))  # unaligned, two accumulators / register operands
_U_SMALL = ((64, 64, 16, 8, 2),)
_U_FP64 = ((32, 32, 32, 4, 2), (64, 32, 16, 8, 2))
_U_FP64_TWO = ((32, 32, 16, 4, 2), (64, 32, 16, 8, 2))
_TILES = {
    ("forward", "16-bit", False, True): _ROW_16,
    ("forward", "16-bit", True, True): ((128, 64, 64, 8, 3), (64, 128, 64, 8, 4)),
    ("forward", "tf32", False, True): _ROW_TF32,
    ("forward", "tf32", True, True): ((128, 64, 32, 8, 4), (64, 64, 32, 8, 4)),
    ("forward", "tf32x3", False, True): _ROW_TF32X3,
    ("forward", "tf32x3", True, True): ((64, 64, 32, 8, 4),),
    ("forward", "fp64", False, True): ((32, 64, 32, 4, 2),) + _FP64_SMALL,
    ("forward", "fp64", True, True): _FP64_SMALL,
    ("grad_input", "16-bit", False, True): _ROW_16,
    ("grad_input", "16-bit", True, True): ((128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 4, 4),
                                           (64, 128, 64, 8, 4)),
    ("grad_input", "tf32", False, True): _ROW_TF32,
    ("grad_input", "tf32", True, True): ((128, 128, 32, 8, 3), (128, 64, 32, 8, 4), (64, 128, 32, 4, 4),
                                         (64, 64, 32, 8, 4)),
    ("grad_input", "tf32x3", False, True): _ROW_TF32X3,
    ("grad_input", "tf32x3", True, True): ((128, 64, 32, 8, 4), (64, 64, 32, 8, 4)),
    ("grad_input", "fp64", False, True): ((32, 64, 32, 4, 2),) + _FP64_SMALL,
    ("grad_input", "fp64", True, True): _FP64_SMALL,
    ("grad_weight", "16-bit", False, True): ((128, 64, 64, 8, 3), (64, 128, 64, 8, 4), (64, 64, 64, 8, 4)),
    ("grad_weight", "16-bit", True, True): ((64, 128, 64, 8, 4), (64, 64, 64, 8, 4)),
    ("grad_weight", "tf32", False, True): ((64, 64, 32, 8, 4), (64, 32, 32, 8, 4)),
    ("grad_weight", "tf32", True, True): ((64, 64, 32, 8, 4), (64, 32, 32, 8, 4)),
    ("grad_weight", "tf32x3", False, True): ((64, 64, 32, 8, 4), (64, 32, 32, 8, 4)),
    ("grad_weight", "tf32x3", True, True): ((64, 64, 32, 8, 4), (64, 32, 32, 8, 4)),
    ("grad_weight", "fp64", False, True): _FP64_SMALL,
    ("grad_weight", "fp64", True, True): _FP64_SMALL,
    ("forward", "16-bit", False, False): _U_ROW,
    ("forward", "16-bit", True, False): _U_TWO,
    ("forward", "tf32", False, False): _U_ROW,
    ("forward", "tf32", True, False): _U_TWO,
    ("forward", "tf32x3", False, False): _U_ROW,
    ("forward", "tf32x3", True, False): _U_TWO,
    ("forward", "fp64", False, False): _U_FP64,
    ("forward", "fp64", True, False): _U_FP64_TWO,
    ("grad_input", "16-bit", False, False): _U_ROW,
    ("grad_input", "16-bit", True, False): _U_ROW,
    ("grad_input", "tf32", False, False): _U_ROW,
    ("grad_input", "tf32", True, False): _U_TWO,
    ("grad_input", "tf32x3", False, False): _U_ROW,
    ("grad_input", "tf32x3", True, False): _U_SMALL,
    ("grad_input", "fp64", False, False): _U_FP64,
    ("grad_input", "fp64", True, False): _U_FP64_TWO,
    ("grad_weight", "16-bit", False, False): _U_TWO,
    ("grad_weight", "16-bit", True, False): _U_TWO,
    ("grad_weight", "tf32", False, False): _U_TWO,
    ("grad_weight", "tf32", True, False): _U_SMALL,
    ("grad_weight", "tf32x3", False, False): _U_SMALL,  # 64x64x32 spills with Triton 3.6 (44 LDL / 47 STL)
    ("grad_weight", "tf32x3", True, False): _U_SMALL,
    ("grad_weight", "fp64", False, False): _U_FP64_TWO,
    ("grad_weight", "fp64", True, False): _U_FP64_TWO,
}
# The EMBED kernels (hyper op with e computed in-kernel) per (kind, operand class, aligned layout)
# where their tiles differ from the hyper op's: grad input and grad weight compute the e1 tile in
# their K loops (M unrolled FMAs into a tile next to the accumulators), so the hyper tiles that spill
# with it for some M of SM90_EMBED_M are left out (and small ones added where none was left).
_EMBED_TILES = {
    ("grad_input", "16-bit", True): ((128, 64, 64, 8, 3), (64, 128, 64, 8, 4)),
    ("grad_input", "tf32", True): ((128, 64, 32, 8, 4), (64, 64, 32, 8, 4)),
    ("grad_input", "tf32x3", False): ((64, 64, 16, 4, 2), (64, 32, 16, 4, 2)),
    ("grad_input", "fp64", False): ((32, 32, 16, 4, 2),),
    ("grad_weight", "16-bit", True): ((64, 64, 64, 8, 4),),
    ("grad_weight", "fp64", True): ((32, 32, 16, 4, 2),),
}


def operand_class(dtype: torch.dtype, precision: str) -> str:
    """"16-bit" (bf16, fp16), "tf32" / "tf32x3" (fp32 by dot precision) or "fp64"."""
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return "tf32x3" if precision == "tf32x3" else "tf32"
    return "16-bit"


_OPERAND_BYTES = {"16-bit": 2, "tf32": 4, "tf32x3": 4, "fp64": 8}
SM90_MAX_SHARED = 232448  # bytes of shared memory one block may opt into on sm_90 (as in bench/static_gpu_report.py)


def pipelined_shared_bytes(kind: str, cls: str, hyper: bool, tile, embed_m: int = 0) -> int:
    """Shared memory the software pipeline of a tile takes: num_stages copies of every 2-D tile
    its reduction loop loads (forward: x, W and for hyper Delta; grad_input: g, W and for hyper
    e1, Delta; grad_weight: g^T, x and for hyper e1). Triton 3.6 on an H200 asked for exactly this
    (+512 B) for the hyper grad_input (128, 128, 32) tf32 tile with 4 stages: 262656 B, over the
    232448 B an sm_90 block may use, so the launch failed. Independent of the Triton version, unlike
    the compiled kernels' metadata that bench/static_gpu_report.py reads.
    embed_m > 0: the EMBED kernels with M = embed_m hyperparameters, which load no e1 tile but, per
    stage, M rows of embT and M values of hp across the tile (counted for both of their K-loop kernels;
    the sm_90 builds used less than this estimate)."""
    m, n, k, _warps, stages = tile
    e1_tile = 0 if embed_m else m * k
    if kind == "grad_weight":  # (BLOCK_O, BLOCK_R) g^T and (BLOCK_R, BLOCK_I) x
        elements = m * k + k * n + ((e1_tile + embed_m * (m + k)) if hyper else 0)
    elif kind == "grad_input":  # (BLOCK_M, BLOCK_K) g and (BLOCK_K, BLOCK_N) weight
        elements = m * k + k * n + ((k * n + e1_tile + embed_m * (m + k)) if hyper else 0)
    else:  # forward: (BLOCK_M, BLOCK_K) x and (BLOCK_K, BLOCK_N) weight; e1 / e2 are epilogue loads
        elements = m * k + k * n + (k * n if hyper else 0)
    return stages * elements * _OPERAND_BYTES[cls]


def _device_shared_limit(device: torch.device) -> int | None:
    """Shared memory one block may opt into on device (None: unknown, e.g. ROCm's properties lack it)."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", None) or getattr(props, "shared_memory_per_block", None)


def _interpreter_config(kind: str):
    m, n, k = _KIND_AXES[kind]
    if kind == "grad_weight":
        return triton.Config({m: 32, n: 32, k: 16, "GROUP_M": 4}, num_warps=4, num_stages=1)
    return triton.Config({m: 16, n: 32, k: 16, "GROUP_M": 4}, num_warps=4, num_stages=1)


def _configs(kind: str) -> dict:
    """{tile: triton.Config} for kind; the interpreter gets one small config (tile None)."""
    if INTERPRET:
        return {None: _interpreter_config(kind)}
    m, n, k = _KIND_AXES[kind]
    tiles = sorted({tile for table in (_TILES, _EMBED_TILES) for (knd, *_), group in table.items() if knd == kind
                    for tile in group}, reverse=True)
    return {tile: triton.Config({m: tile[0], n: tile[1], k: tile[2], "GROUP_M": 8}, num_warps=tile[3],
                                num_stages=tile[4]) for tile in tiles}


_CONFIGS = {kind: _configs(kind) for kind in _KIND_AXES}


def tile_table(kind: str, cls: str, hyper: bool, aligned: bool, embed: bool = False) -> tuple:
    """The tiles of kind for an operand class, op and layout class; embed: the hyper op's EMBED kernels."""
    if embed and (kind, cls, bool(aligned)) in _EMBED_TILES:
        return _EMBED_TILES[(kind, cls, bool(aligned))]
    return _TILES[(kind, cls, bool(hyper), bool(aligned))]


def launchable_configs(kind: str, dtype: torch.dtype, hyper: bool, precision: str, aligned: bool,
                       shared_limit: int | None = None, embed_m: int = 0) -> list:
    """The triton.Config objects the autotuner of kind ("forward", "grad_input", "grad_weight") may
    launch for this input dtype, op (hyper or not; embed_m > 0: the EMBED kernels with that many
    hyperparameters), tl.dot input precision and layout class; with shared_limit, only the tiles whose
    pipelined_shared_bytes fit it (at least the smallest one)."""
    if INTERPRET:
        return list(_CONFIGS[kind].values())
    cls = operand_class(dtype, precision)
    tiles = tile_table(kind, cls, hyper, aligned, embed_m > 0)
    if shared_limit is not None:
        tiles = tiles_that_fit(tiles, kind, cls, hyper, shared_limit, embed_m)
    return [_CONFIGS[kind][tile] for tile in tiles]


def tiles_that_fit(tiles, kind: str, cls: str, hyper: bool, shared_limit: int, embed_m: int = 0) -> list:
    """The tiles whose pipelined_shared_bytes fit shared_limit; the smallest one if none does."""
    def need(t):
        return pipelined_shared_bytes(kind, cls, hyper, t, embed_m)

    return [t for t in tiles if need(t) <= shared_limit] or [min(tiles, key=need)]


def _pruner(kind: str, tensor_arg: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        t = args[tensor_arg]
        keep = {id(c) for c in launchable_configs(kind, t.dtype, args["HYPER"], args["DOT_PRECISION"], args["ALIGNED"],
                                                  _device_shared_limit(t.device),
                                                  args["M"] if args["EMBED"] else 0)}
        return [c for c in configs if id(c) in keep]
    return prune


def _min_tile(kind: str, axis: int) -> int:
    return min(c.kwargs[_KIND_AXES[kind][axis]] for c in _CONFIGS[kind].values())


# The autotuner caches its choice per key. Both ops share one kernel per kind, and the batch op passes
# placeholder tensors of the same dtype for the hyper-only ones, so the key must hold every argument
# the pruner reads (HYPER, DOT_PRECISION, ALIGNED): without HYPER, the hyper op reused the batch op's
# choice at the same shape, a tile the hyper kernel cannot fit in shared memory (seen on an H200).
# Likewise EMBED and M: the EMBED kernels (e computed in-kernel) have their own tile tables and
# shared-memory needs (_EMBED_TILES, pipelined_shared_bytes), and each M is a kernel of its own.
TUNING_KEY = ["E", "B", "IN", "OUT", "ALIGNED", "HYPER", "EMBED", "M", "DOT_PRECISION"]


def _autotuned(kernel, kind: str, tensor_arg: str, **kwargs):
    return triton.autotune(list(_CONFIGS[kind].values()), key=TUNING_KEY,
                           prune_configs_by={"early_config_prune": _pruner(kind, tensor_arg)}, **kwargs)(kernel)


_forward = _autotuned(rank1_linear_forward_kernel, "forward", "x_ptr")
_grad_input = _autotuned(rank1_linear_grad_input_kernel, "grad_input", "g_ptr")
_grad_weight = _autotuned(rank1_linear_grad_weight_kernel, "grad_weight", "g_ptr",
                          pre_hook=zero_present(["ds_part_ptr", "dr_part_ptr", "dv_part_ptr", "du_part_ptr"]))


# ----------------------------------------------------------------------------------------------
# launchers (inputs validated by hyperkern.ops; x, weight, delta, e1, e2, grad may be strided;
# the per-member vectors r, s, u, v, bias, delta_bias must be contiguous (E, width))
# ----------------------------------------------------------------------------------------------
def accumulator_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision for this input dtype.

    float32 follows torch.get_float32_matmul_precision(): "high"/"medium" allow TF32 ("tf32", one
    tensor-core pass), "highest" (torch's default) asks for fp32 accuracy, which we serve with
    "tf32x3" (three TF32 tensor-core passes with a hi/lo split, error close to fp32 FMA) rather than
    the much slower FMA path. Other dtypes: "ieee" (the flag only affects fp32 operands)."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def unit_inner_stride(t):
    """t itself when its last dimension has unit stride, else a contiguous copy. The GEMM kernels are
    compiled (and checked by the static report) for unit inner strides only: a fully strided operand
    would need element-wise address arithmetic and spills registers."""
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def operand_layout_aligned(ints, tensors) -> bool:
    """The aligned layout class of a launch: every width / row stride in ints a multiple of 16
    elements and every tensor's base pointer 16-byte aligned (inner strides are 1 by the launchers'
    policy). Triton then specialises the kernel for vectorised asynchronous copies."""
    return all(int(i) % 16 == 0 for i in ints) and all(t.data_ptr() % 16 == 0 for t in tensors if t is not None)


def _check_vectors(*tensors):
    for t in tensors:
        if t is not None and not t.is_contiguous():
            raise ValueError("per-member vectors (r, s, u, v, bias, delta_bias) must be contiguous (E, width)")


def embedding_operands(hparams, embedding):
    """(hp, embT) for the EMBED launches: hparams (E*B, m) with a unit inner stride and a 16-byte aligned
    base pointer (a copy otherwise: it is tiny), and the embedding weight (out or 2*out, m) transposed to a
    contiguous (m, out or 2*out) embT, so the kernels read a row of embT across a tile's columns."""
    hp = unit_inner_stride(hparams)
    if hp.data_ptr() % 16 != 0:
        hp = hp.clone(memory_format=torch.contiguous_format)
    return hp, embedding.t().contiguous()


def _embed_launch_args(hp, embt, dummy):
    """(hp, embT, M, stride_hm, stride_et) kernel arguments; placeholders without an embedding."""
    if hp is None:
        return dummy, dummy, 0, 0, 0
    return hp, embt, hp.shape[1], hp.stride(0), embt.stride(0)


def _check_embedding(hp, embt, delta, e1):
    if hp is None:
        return
    if delta is None or e1 is not None:
        raise ValueError("hparams / embedding_t are the hyper op's e1 / e2 source: pass delta and no e1 / e2")
    if embt is None or embt.stride(-1) != 1 or (hp.shape[1] > 1 and hp.stride(-1) != 1):
        raise ValueError("hparams and embedding_t need unit inner strides (see embedding_operands)")


def rank1_linear_forward(x, weight, r, s, bias=None, delta=None, u=None, v=None, e1=None, delta_bias=None,
                         e2=None, store_delta_out: bool = False, hparams=None, embedding_t=None):
    """Launch the forward kernel. Returns (y, delta_out): y (E*B, out) in x.dtype; delta_out is the
    pre-scale Delta product (x * u_k) @ Delta^T (E*B, out) when store_delta_out (hyper op), else None.
    The hyper op is selected by passing delta (then u, v and either e1 (with delta_bias also e2) or
    hparams and embedding_t are required). With hparams (E*B, m) and embedding_t (m, out or 2*out), from
    embedding_operands, e1 / e2 are computed inside the kernel (EMBED): no (E*B, out) e tensor exists."""
    refuse_interpreted_bfloat16(x)
    _check_vectors(r, s, bias, u, v, delta_bias)
    _check_embedding(hparams, embedding_t, delta, e1)
    x, weight, delta, e1, e2 = map(unit_inner_stride, (x, weight, delta, e1, e2))
    hyper = delta is not None
    embed = hparams is not None
    N, IN = x.shape
    OUT = weight.shape[0]
    E = r.shape[0]
    B = N // E
    y = torch.empty((N, OUT), dtype=x.dtype, device=x.device)
    delta_out = torch.empty((N, OUT), dtype=x.dtype, device=x.device) if (hyper and store_delta_out) else None
    if N == 0 or OUT == 0:
        return y, delta_out
    dummy = y
    aligned = operand_layout_aligned(
        (IN, OUT, x.stride(0), weight.stride(0)) + ((delta.stride(0),) if hyper else ())
        + ((e1.stride(0),) if hyper and not embed else ()) + ((e2.stride(0),) if e2 is not None else ())
        + ((embedding_t.stride(0),) if embed else ()),
        (x, weight, r, s, bias, delta, u, v, e1, delta_bias, e2, hparams, embedding_t, y, delta_out))
    hp, embt, M, stride_hm, stride_et = _embed_launch_args(hparams, embedding_t, dummy)
    grid = lambda meta: (E * triton.cdiv(B, meta["BLOCK_M"]) * triton.cdiv(OUT, meta["BLOCK_N"]),)  # noqa: E731
    _forward[grid](
        x, weight, r, s, bias if bias is not None else dummy,
        delta if hyper else dummy, u if hyper else dummy, v if hyper else dummy, e1 if e1 is not None else dummy,
        delta_bias if delta_bias is not None else dummy, e2 if e2 is not None else dummy, hp, embt,
        y, delta_out if delta_out is not None else dummy,
        E, B, IN, OUT,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        delta.stride(0) if hyper else 0, delta.stride(1) if hyper else 0,
        e1.stride(0) if e1 is not None else 0, e1.stride(1) if e1 is not None else 0,
        e2.stride(0) if e2 is not None else 0, e2.stride(1) if e2 is not None else 0, stride_hm, stride_et,
        HAS_BIAS=bias is not None, HYPER=hyper, HAS_DELTA_BIAS=hyper and delta_bias is not None, EMBED=embed, M=M,
        STORE_DELTA_OUT=delta_out is not None, DOT_PRECISION=dot_precision(x.dtype),
        ACC_DTYPE=accumulator_dtype(x.dtype), ALIGNED=aligned)
    return y, delta_out


def rank1_linear_grad_input(grad, weight, r, s, delta=None, u=None, v=None, e1=None, hparams=None,
                            embedding_t=None):
    """dx (E*B, in) = ((grad * s_k) @ W) * r_k [+ ((grad * v_k * e1) @ Delta) * u_k] in grad.dtype; e1
    given, or computed in-kernel from hparams and embedding_t (see rank1_linear_forward)."""
    refuse_interpreted_bfloat16(grad)
    _check_vectors(r, s, u, v)
    _check_embedding(hparams, embedding_t, delta, e1)
    grad, weight, delta, e1 = map(unit_inner_stride, (grad, weight, delta, e1))
    hyper = delta is not None
    embed = hparams is not None
    N, OUT = grad.shape
    IN = weight.shape[1]
    E = r.shape[0]
    B = N // E
    dx = torch.empty((N, IN), dtype=grad.dtype, device=grad.device)
    if N == 0 or IN == 0:
        return dx
    if OUT == 0:
        return dx.zero_()
    dummy = dx
    aligned = operand_layout_aligned(
        (IN, OUT, grad.stride(0), weight.stride(0)) + ((delta.stride(0),) if hyper else ())
        + ((e1.stride(0),) if hyper and not embed else ()) + ((embedding_t.stride(0),) if embed else ()),
        (grad, weight, r, s, delta, u, v, e1, hparams, embedding_t, dx))
    hp, embt, M, stride_hm, stride_et = _embed_launch_args(hparams, embedding_t, dummy)
    grid = lambda meta: (E * triton.cdiv(B, meta["BLOCK_M"]) * triton.cdiv(IN, meta["BLOCK_N"]),)  # noqa: E731
    _grad_input[grid](
        grad, weight, r, s, delta if hyper else dummy, u if hyper else dummy, v if hyper else dummy,
        e1 if e1 is not None else dummy, hp, embt, dx,
        E, B, IN, OUT,
        grad.stride(0), grad.stride(1), weight.stride(0), weight.stride(1),
        delta.stride(0) if hyper else 0, delta.stride(1) if hyper else 0,
        e1.stride(0) if e1 is not None else 0, e1.stride(1) if e1 is not None else 0, stride_hm, stride_et,
        HYPER=hyper, EMBED=embed, M=M, DOT_PRECISION=dot_precision(grad.dtype),
        ACC_DTYPE=accumulator_dtype(grad.dtype), ALIGNED=aligned)
    return dx


def rank1_linear_grad_weight(grad, x, weight, r, s, e1=None, delta=None, u=None, v=None, hparams=None,
                             embedding_t=None):
    """Weight-side gradients in one launch: returns (dW, dr, ds) for the batch op, and additionally
    (dDelta, du, dv) for the hyper op (given delta, u, v and e1, or hparams and embedding_t as in
    rank1_linear_forward), each in the dtype of its input."""
    refuse_interpreted_bfloat16(grad)
    _check_vectors(r, s, u, v)
    _check_embedding(hparams, embedding_t, delta, e1)
    grad, x, weight, delta, e1 = map(unit_inner_stride, (grad, x, weight, delta, e1))
    hyper = delta is not None
    embed = hparams is not None
    N, OUT = grad.shape
    IN = x.shape[1]
    E = r.shape[0]
    B = N // E
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    dev = grad.device
    n_part_in = max(1, triton.cdiv(IN, _min_tile("grad_weight", 1)))
    n_part_out = max(1, triton.cdiv(OUT, _min_tile("grad_weight", 0)))
    dw = torch.empty((OUT, IN), dtype=weight.dtype, device=dev)
    ds_part = torch.zeros((E, n_part_in, OUT), dtype=acc, device=dev)
    dr_part = torch.zeros((E, n_part_out, IN), dtype=acc, device=dev)
    ddelta = torch.empty((OUT, IN), dtype=delta.dtype, device=dev) if hyper else None
    dv_part = torch.zeros((E, n_part_in, OUT), dtype=acc, device=dev) if hyper else ds_part
    du_part = torch.zeros((E, n_part_out, IN), dtype=acc, device=dev) if hyper else dr_part
    if OUT > 0 and IN > 0:
        if N == 0:
            dw.zero_()
            if hyper:
                ddelta.zero_()
        else:
            aligned = operand_layout_aligned(
                (IN, OUT, grad.stride(0), x.stride(0), weight.stride(0)) + ((delta.stride(0),) if hyper else ())
                + ((e1.stride(0),) if hyper and not embed else ()) + ((embedding_t.stride(0),) if embed else ()),
                (grad, x, weight, r, s, delta, u, v, e1, hparams, embedding_t, dw, ddelta))
            hp, embt, M, stride_hm, stride_et = _embed_launch_args(hparams, embedding_t, dw)
            grid = lambda meta: (triton.cdiv(OUT, meta["BLOCK_O"]) * triton.cdiv(IN, meta["BLOCK_I"]),  # noqa: E731
                                 2 if hyper else 1)
            _grad_weight[grid](
                grad, x, weight, r, s, delta if hyper else dw, u if hyper else dw, v if hyper else dw,
                e1 if e1 is not None else dw, hp, embt,
                dw, ddelta if hyper else dw, ds_part, dr_part, dv_part, du_part,
                E, B, IN, OUT, n_part_in, n_part_out,
                grad.stride(0), grad.stride(1), x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
                delta.stride(0) if hyper else 0, delta.stride(1) if hyper else 0,
                e1.stride(0) if e1 is not None else 0, e1.stride(1) if e1 is not None else 0, stride_hm, stride_et,
                HYPER=hyper, EMBED=embed, M=M, DOT_PRECISION=dot_precision(grad.dtype),
                ACC_DTYPE=accumulator_dtype(grad.dtype), ALIGNED=aligned)
    out = (dw, dr_part.sum(1).to(r.dtype), ds_part.sum(1).to(s.dtype))
    if hyper:
        out += (ddelta, du_part.sum(1).to(u.dtype), dv_part.sum(1).to(v.dtype))
    return out


def rank1_linear_grad_rowwise(grad, E: int, bias_grad: bool, v=None, delta_out=None, e2=None, delta_bias=None):
    """Row-wise gradient terms in one pass over grad: returns (dbias, de1, ddelta_bias, de2), each None
    unless asked for: bias_grad -> dbias (E, out); delta_out (with v) -> de1 = grad * v_k * delta_out;
    e2 (with delta_bias) -> ddelta_bias = member sums of grad * e2 and de2 = grad * delta_bias_k."""
    refuse_interpreted_bfloat16(grad)
    _check_vectors(v, delta_bias)
    grad, e2 = unit_inner_stride(grad), unit_inner_stride(e2)
    N, OUT = grad.shape
    B = N // E
    e1_grad = delta_out is not None
    db_grad = e2 is not None
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    dev = grad.device
    T = triton.cdiv(B, ROWWISE_BLOCK_M) if B > 0 else 0
    db_part = torch.zeros((E * T, OUT), dtype=acc, device=dev) if bias_grad else None
    ddb_part = torch.zeros((E * T, OUT), dtype=acc, device=dev) if db_grad else None
    de1 = torch.empty((N, OUT), dtype=grad.dtype, device=dev) if e1_grad else None
    de2 = torch.empty((N, OUT), dtype=grad.dtype, device=dev) if db_grad else None
    if (bias_grad or e1_grad or db_grad) and N > 0 and OUT > 0:
        dummy = db_part if db_part is not None else (de1 if de1 is not None else de2)
        grid = (E * T, triton.cdiv(OUT, ROWWISE_BLOCK_N))
        rank1_linear_grad_rowwise_kernel[grid](
            grad, delta_out if e1_grad else dummy, v if e1_grad else dummy, e2 if db_grad else dummy,
            delta_bias if db_grad else dummy, dummy, dummy,
            db_part if bias_grad else dummy, ddb_part if db_grad else dummy,
            de1 if e1_grad else dummy, de2 if db_grad else dummy, dummy, dummy,
            E, B, OUT, grad.stride(0), grad.stride(1),
            e2.stride(0) if db_grad else 0, e2.stride(1) if db_grad else 0, 0, 0,
            BIAS_GRAD=bias_grad, E1_GRAD=e1_grad, DELTA_BIAS_GRAD=db_grad, EMBED=False, M=0, E2_GRAD=False,
            EMB_GRAD=False, HP_GRAD=False, ACC_DTYPE=accumulator_dtype(grad.dtype),
            BLOCK_M=ROWWISE_BLOCK_M, BLOCK_N=ROWWISE_BLOCK_N, num_warps=4)
    dbias = db_part.view(E, T, OUT).sum(1).to(grad.dtype) if bias_grad else None
    ddb = ddb_part.view(E, T, OUT).sum(1).to(grad.dtype) if db_grad else None
    return dbias, de1, ddb, de2


def rank1_linear_grad_rowwise_embedded(grad, E: int, bias_grad: bool, hparams, embedding_t, v=None, delta_out=None,
                                       delta_bias=None, delta_bias_grad: bool = False, embedding_grad: bool = False,
                                       hparams_grad: bool = False):
    """The row-wise pass of the hyper op with e computed in-kernel (EMBED; hparams (E*B, m), embedding_t
    (m, out or 2*out) from embedding_operands, 2*out columns exactly when delta_bias is given). Returns
    (dbias, ddelta_bias, dembedding, dhparams), each None unless asked for: bias_grad -> dbias (E, out);
    delta_bias_grad -> ddelta_bias = member sums of grad * e2; embedding_grad / hparams_grad (they need
    v and delta_out = (x * u_k) @ Delta^T) -> d(embedding) (out or 2*out, m) and d(hparams) (E*B, m),
    reduced in-kernel from de1 = grad * v_k * delta_out and de2 = grad * delta_bias_k into per-tile
    partials (the kernel's docstring) that are summed here in the accumulator dtype. No (E*B, out) tensor
    of e or de is made."""
    refuse_interpreted_bfloat16(grad)
    _check_vectors(v, delta_bias)
    grad = unit_inner_stride(grad)
    N, OUT = grad.shape
    B = N // E
    M = hparams.shape[1]
    e_grads = embedding_grad or hparams_grad
    if e_grads and (v is None or delta_out is None):
        raise ValueError("the embedding / hparams gradients need v and delta_out")
    e2_grad = e_grads and delta_bias is not None
    db_grad = delta_bias_grad and delta_bias is not None
    out2 = 2 * OUT if delta_bias is not None else OUT
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    dev = grad.device
    T = triton.cdiv(B, ROWWISE_BLOCK_M) if B > 0 else 0
    block_n = rowwise_block_n(grad.dtype, True)
    n_col = triton.cdiv(OUT, block_n)
    db_part = torch.zeros((E * T, OUT), dtype=acc, device=dev) if bias_grad else None
    ddb_part = torch.zeros((E * T, OUT), dtype=acc, device=dev) if db_grad else None
    # every slot of these two is written by exactly one program
    demb_part = torch.empty((E * T, M, out2), dtype=acc, device=dev) if embedding_grad else None
    dhp_part = torch.empty((n_col, N, M), dtype=acc, device=dev) if hparams_grad else None
    if (bias_grad or e_grads or db_grad) and N > 0 and OUT > 0:
        dummy = grad
        pick = lambda t: t if t is not None else dummy  # noqa: E731
        grid = (E * T, n_col)
        rank1_linear_grad_rowwise_kernel[grid](
            grad, pick(delta_out if e_grads else None), pick(v if e_grads else None), dummy, pick(delta_bias),
            hparams, embedding_t, pick(db_part), pick(ddb_part), dummy, dummy, pick(demb_part), pick(dhp_part),
            E, B, OUT, grad.stride(0), grad.stride(1), 0, 0, hparams.stride(0), embedding_t.stride(0),
            BIAS_GRAD=bias_grad, E1_GRAD=e_grads, DELTA_BIAS_GRAD=db_grad, EMBED=True, M=M, E2_GRAD=e2_grad,
            EMB_GRAD=embedding_grad, HP_GRAD=hparams_grad, ACC_DTYPE=accumulator_dtype(grad.dtype),
            BLOCK_M=ROWWISE_BLOCK_M, BLOCK_N=block_n, num_warps=4)
    dbias = db_part.view(E, T, OUT).sum(1).to(grad.dtype) if bias_grad else None
    ddb = ddb_part.view(E, T, OUT).sum(1).to(grad.dtype) if db_grad else None
    demb = demb_part.sum(0).t().contiguous().to(embedding_t.dtype) if embedding_grad else None
    dhp = dhp_part.sum(0).to(hparams.dtype) if hparams_grad else None
    return dbias, ddb, demb, dhp


# ----------------------------------------------------------------------------------------------
# sm_90 compile specs (bench/static_gpu_report.py)
# ----------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def sm90_signature(fn, pointer_dtypes: dict, unit_args=(), constexprs=None, not_divisible=(),
                   aligned_pointers: bool = True):
    """(signature, constexprs, attrs) for triton.compile(ASTSource(...)) as a launch with contiguous
    tensors specialises: arguments named in unit_args (inner strides) become the constant 1, pointers
    and the remaining ints carry tt.divisibility=16 (16-byte aligned storage, widths and strides
    multiples of 16) except the ints in not_divisible (and the pointers unless aligned_pointers).
    pointer_dtypes maps each pointer argument to its
    element type ("bf16", "fp32", ...); every other argument must be an int or in constexprs."""
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
            if aligned_pointers:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name not in not_divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


_UNIT_STRIDES = ("stride_xk", "stride_wk", "stride_dk", "stride_e1n", "stride_e2n", "stride_gn")
_PARTIAL_POINTERS = ("ds_part_ptr", "dr_part_ptr", "dv_part_ptr", "du_part_ptr", "db_part_ptr", "ddb_part_ptr",
                     "demb_part_ptr", "dhp_part_ptr")
# hparams' row stride is the number of hyperparameters m (a handful): never a multiple of 16
_EMBED_NOT_DIVISIBLE = ("stride_hm",)
# The numbers of hyperparameters (the EMBED kernels' constexpr M) the sm_90 report compiles: every m
# up to 8, which covers the models here (l2_space: 6 L2 groups for ResNet and LeNet, + dropout for
# LeNet). Spills are not monotone in M (one config spilled at M = 5 only), so each is compiled; a
# larger m runs the same tables unchecked.
SM90_EMBED_M = tuple(range(1, 9))


def sm90_compile_specs() -> list:
    """Every kernel of this module at every config it can launch with on an H100, per input dtype
    (bf16, fp16, fp32 as tf32 and as tf32x3, fp64) and layout class, with all optional features of
    each variant on (bias, delta_bias/e2, stored Delta product). Layout classes (the launchers give
    every 2-D operand a unit inner stride): "aligned" = widths, row strides and pointers divisible by
    16 (the specialisation Triton makes for such launches); "unaligned" = no divisibility at all
    (e.g. in_features = 19), the worst case of the other specialisations. Variants: batch, hyper (e1 /
    e2 given) and "embed m=M" (EMBED: e in-kernel, all gradients incl. d(embedding) and d(hparams)) for
    every M in SM90_EMBED_M; hparams' row stride (= M) never carries the divisibility hint.
    Keys (see bench/static_gpu_report.py): name, fn, signature, constexprs, attrs, num_warps,
    num_stages, dtype, gemm, config."""
    variants = []  # (name, fn, kind, hyper, embed, feature constexprs)
    kinds = [("batch", False, 0), ("hyper", True, 0)] + [(f"embed m={m}", True, m) for m in SM90_EMBED_M]
    for tag, hyper, m in kinds:
        embed = m > 0
        variants.append((f"rank1_linear_forward[{tag}]", rank1_linear_forward_kernel, "forward", hyper, embed,
                         dict(HAS_BIAS=True, HYPER=hyper, HAS_DELTA_BIAS=hyper, EMBED=embed, M=m,
                              STORE_DELTA_OUT=hyper)))
        variants.append((f"rank1_linear_grad_input[{tag}]", rank1_linear_grad_input_kernel, "grad_input", hyper,
                         embed, dict(HYPER=hyper, EMBED=embed, M=m)))
        variants.append((f"rank1_linear_grad_weight[{tag}]", rank1_linear_grad_weight_kernel, "grad_weight", hyper,
                         embed, dict(HYPER=hyper, EMBED=embed, M=m)))
    precisions = ((torch.bfloat16, "ieee"), (torch.float16, "ieee"), (torch.float32, "tf32"),
                  (torch.float32, "tf32x3"), (torch.float64, "ieee"))
    specs = []

    def layout(fn, aligned):  # (ints without the divisibility hint, label)
        return (("E",) + _EMBED_NOT_DIVISIBLE, "") if aligned else (tuple(fn.arg_names), " unaligned")

    for dtype, precision in precisions:
        elem = _TRITON_DTYPE[dtype]
        acc = "fp64" if dtype == torch.float64 else "fp32"
        dtype_name = elem if dtype != torch.float32 else f"fp32/{precision}"
        for aligned in (True, False):
            for name, fn, kind, hyper, embed, features in variants:
                pointers = {a: (acc if a in _PARTIAL_POINTERS else elem) for a in fn.arg_names if a.endswith("_ptr")}
                not_divisible, label = layout(fn, aligned)
                for cfg in launchable_configs(kind, dtype, hyper, precision, aligned, embed_m=features["M"]):
                    consts = dict(features, DOT_PRECISION=precision, ACC_DTYPE=accumulator_dtype(dtype),
                                  ALIGNED=aligned, **cfg.kwargs)
                    signature, consts, attrs = sm90_signature(fn, pointers, _UNIT_STRIDES, consts, not_divisible,
                                                              aligned_pointers=aligned)
                    m, n, k = _KIND_AXES[kind]
                    specs.append(dict(name=name, fn=fn, signature=signature, constexprs=consts, attrs=attrs,
                                      num_warps=cfg.num_warps, num_stages=cfg.num_stages, dtype=dtype_name + label,
                                      gemm=True, config=f"{cfg.kwargs[m]}x{cfg.kwargs[n]}x{cfg.kwargs[k]} "
                                                        f"w{cfg.num_warps} s{cfg.num_stages}"))
            fn = rank1_linear_grad_rowwise_kernel
            if precision == "tf32x3":  # no dot: the fp32 build is the same for both precisions
                continue
            pointers = {a: (acc if a in _PARTIAL_POINTERS else elem) for a in fn.arg_names if a.endswith("_ptr")}
            for tag, m in [("hyper", 0)] + [(f"embed m={m}", m) for m in SM90_EMBED_M]:
                embed = m > 0
                block_n = rowwise_block_n(dtype, embed)
                consts = dict(BIAS_GRAD=True, E1_GRAD=True, DELTA_BIAS_GRAD=True, EMBED=embed, M=m, E2_GRAD=embed,
                              EMB_GRAD=embed, HP_GRAD=embed, ACC_DTYPE=accumulator_dtype(dtype),
                              BLOCK_M=ROWWISE_BLOCK_M, BLOCK_N=block_n)
                not_divisible, label = layout(fn, aligned)
                signature, consts, attrs = sm90_signature(fn, pointers, _UNIT_STRIDES, consts, not_divisible,
                                                          aligned_pointers=aligned)
                specs.append(dict(name=f"rank1_linear_grad_rowwise[{tag}]", fn=fn, signature=signature,
                                  constexprs=consts, attrs=attrs, num_warps=4, num_stages=1, dtype=elem + label,
                                  gemm=False, config=f"{ROWWISE_BLOCK_M}x{block_n} w4"))
    return specs
