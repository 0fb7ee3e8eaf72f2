"""Triton kernels: NF4 dequantize, NF4 matmul (forward and input gradient), W4A16 matmul and
dequantize (GPTQ and AWQ-GEMM layouts), and GEMVs for M <= GEMV_MAX_M rows (W4A16 and the NF4
forward; float32 register reduction, no tensor cores).

Numerics (docs/kernels.md#pitfalls):
- No TF32. With fp16/bf16 activations the weight tile is dequantized straight into the
  activation dtype and `tl.dot` takes fp16/bf16 operands with float32 accumulation. The
  weight values equal the twins' (float32 math rounded once to the activation dtype). With
  float32 activations (their callers ask for float32) the dot runs with
  `input_precision="ieee"`, since a plain fp32 `tl.dot` is TF32 on Ampere and Hopper.
- bf16 arithmetic is wrong in the interpreter, so the kernels only load, convert and dot bf16
  (elementwise math is float32, or fp16 when activations and scales are both fp16); bf16
  is checked by compiling only (tests/kernels/test_compile.py).
- Offsets: program ids and row indices become int64 before they meet a row stride, so
  M*K, M*N and the NF4 flat index N*K may pass 2^31.
- Split-K partial sums are reduced in float32 (`_store_tile`).

Launch configurations are explicit (autotune does not run in the interpreter): the wrappers
pick them from the shape with `_w4a16_config` / `_nf4_config`, which `launch_configs` also
enumerates for the compile-only tests. The small-M W4A16 tiles and NF4 dequantize's blocks per
program were chosen by timing on an H200 (scripts/tune_kernels.py); the rest are first choices.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from qlora_kernels.layouts import W4A16Weight
from qlora_quant.nf4 import NESTED_BLOCKSIZE, NF4Tensor

# Activations with at most this many rows take the split-K path (M padded to 16 in the dot).
SPLIT_K_MAX_M = 16
MAX_SPLIT = 16
# From this many rows on, the wrappers dequantize the whole weight once (one launch, into the
# activation dtype) and call cuBLAS, which beats an in-register-dequantizing Triton GEMM once
# the problem is compute-bound. Both values are guesses (exllama switches at M = 32, vLLM at 50,
# with different kernels): they must be measured on the target GPU (scripts/bench_kernels.py
# reports both paths per M) and set here.
W4A16_CUBLAS_MIN_M = 1024
NF4_CUBLAS_MIN_M = 1024


# ---------------------------------------------------------------- shared pieces

@triton.jit
def _dot(a, b, acc):
    """acc + a @ b, accumulated in float32. float32 operands are multiplied at full precision
    ("ieee"): the default for float32 is TF32 on Ampere and Hopper."""
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _store_tile(acc, out_ptrs, ws_ptrs, mask, count_ptr, SPLIT: tl.constexpr):
    """Store the float32 tile `acc` into out, cast to out's dtype.

    With SPLIT > 1, `acc` is one of SPLIT partial sums of the tile (program axis 2 splits the
    reduction). Each is added with relaxed float32 atomics into a float32 workspace; a per-tile
    counter (acq_rel: it orders the adds before it) tells the program that arrives last, which
    reads the total, stores it in out's dtype and leaves workspace and counter at zero for the
    next call. So a split-K call is one launch: no memset before, no cast after.
    """
    if SPLIT == 1:
        tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds are issued before the counter's release
        arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            # read through an atomic: it is served by L2, where the other programs' adds landed
            # (a plain load may hit a stale L1 line)
            total = tl.atomic_add(ws_ptrs, tl.zeros_like(acc), mask=mask, sem="relaxed")
            total = tl.where(mask, total, 0.0)  # masked lanes return undefined values (the interpreter: garbage)
            tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
            tl.store(ws_ptrs, tl.zeros_like(acc), mask=mask)
            tl.atomic_xchg(count_ptr, 0, sem="relaxed")


_WORKSPACES: dict = {}


def _workspace(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 split-K workspace (at least `floats` elements) and int32 tile counters (at
    least `tiles`), zeroed once and reused: the kernels leave them at zero. One pair per device
    and stream (two streams must not share one); it grows and never shrinks (at most
    SPLIT_K_MAX_M rows of the widest layer). A CUDA graph keeps the workspace of the stream it
    was captured on: two graphs captured on one stream must not be replayed concurrently."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    ws, count = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < floats or count.numel() < tiles:
        floats = max(floats, 0 if ws is None else ws.numel(), 1)
        tiles = max(tiles, 0 if count is None else count.numel(), 1)
        ws = torch.zeros(floats, dtype=torch.float32, device=device)
        count = torch.zeros(tiles, dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # under CUDA graph capture the zeroing is a node of the graph, not done now: this
            # pair is this call's own (zeroed at each replay), never cached for eager calls
            return ws, count
        _WORKSPACES[key] = (ws, count)
    return ws, count


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill; off CUDA (the interpreter) an H100's 132, so the tests
    take the same split decisions as an H100 would."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _split_k(out_tiles: int, red_tiles: int, device: torch.device) -> int:
    """Splits of the reduction: enough programs for about two waves, at least two tiles of the
    reduction per split, at most MAX_SPLIT (untuned)."""
    want = triton.cdiv(2 * _sm_count(device), max(out_tiles, 1))
    return max(1, min(MAX_SPLIT, red_tiles // 2, want))


# ---------------------------------------------------------------- NF4

@triton.jit
def _nf4_code(code_ptr):
    """The 16 code values as scalars: loaded once per program, not gathered per element."""
    return (tl.load(code_ptr + 0), tl.load(code_ptr + 1), tl.load(code_ptr + 2), tl.load(code_ptr + 3),
            tl.load(code_ptr + 4), tl.load(code_ptr + 5), tl.load(code_ptr + 6), tl.load(code_ptr + 7),
            tl.load(code_ptr + 8), tl.load(code_ptr + 9), tl.load(code_ptr + 10), tl.load(code_ptr + 11),
            tl.load(code_ptr + 12), tl.load(code_ptr + 13), tl.load(code_ptr + 14), tl.load(code_ptr + 15))


@triton.jit
def _nf4_lookup(nib, c):
    """float32 code[nib] for int32 nibbles of any shape: a select tree on the nibble's four
    bits over the scalars of `_nf4_code` (registers only; no memory access per element)."""
    b0 = (nib & 1) != 0
    b1 = (nib & 2) != 0
    b2 = (nib & 4) != 0
    b3 = (nib & 8) != 0
    p0 = tl.where(b0, c[1], c[0])
    p1 = tl.where(b0, c[3], c[2])
    p2 = tl.where(b0, c[5], c[4])
    p3 = tl.where(b0, c[7], c[6])
    p4 = tl.where(b0, c[9], c[8])
    p5 = tl.where(b0, c[11], c[10])
    p6 = tl.where(b0, c[13], c[12])
    p7 = tl.where(b0, c[15], c[14])
    q0 = tl.where(b1, p1, p0)
    q1 = tl.where(b1, p3, p2)
    q2 = tl.where(b1, p5, p4)
    q3 = tl.where(b1, p7, p6)
    return tl.where(b3, tl.where(b2, q3, q2), tl.where(b2, q1, q0))


@triton.jit
def _nf4_absmax(blk, mask, qabsmax_ptr, nested_ptr, nested_code_ptr, offset, NESTED: tl.constexpr):
    """float32 absmax of blocks `blk` (int64, any shape): nested_code[qabsmax] * nested + offset.
    Launched with fp fusion off, so the multiply-add rounds twice, as in the twin."""
    qa = tl.load(qabsmax_ptr + blk, mask=mask, other=0).to(tl.int32)
    return tl.load(nested_code_ptr + qa, mask=mask, other=0.0) * tl.load(nested_ptr + blk // NESTED, mask=mask,
                                                                          other=0.0) + offset


@triton.jit
def _nf4_rows(rn, k0, N, K, packed_ptr, qabsmax_ptr, nested_ptr, nested_code_ptr, offset, code,
              DTYPE: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, C: tl.constexpr,
              ALIGNED: tl.constexpr):
    """W[rn, k0 : k0 + C] of the NF4 weight W [N, K] (row-major, flat blocks of BLOCKSIZE), in
    DTYPE, shape [len(rn), C]. Entries outside W are finite and meet zero activations.

    ALIGNED (K % BLOCKSIZE == 0, C divides BLOCKSIZE, k0 % C == 0): each row of the tile is C/2
    whole bytes inside one block, so the bytes are loaded once as a [R, C/2] tile and split
    into nibbles in registers, and one absmax per row is decoded. Otherwise (rows that do not
    start on a block or byte boundary) each element finds its own byte and block."""
    rn64 = rn.to(tl.int64)
    if ALIGNED:
        start = rn64 * K + k0  # flat index of each row's first element: even, inside one block
        rb = tl.arange(0, C // 2)
        byte = tl.load(packed_ptr + (start // 2)[:, None] + rb[None, :], mask=(rn < N)[:, None], other=0,
                       eviction_policy="evict_first").to(tl.int32)
        nib = tl.interleave(byte >> 4, byte & 0xF)  # element 2i: high nibble, 2i+1: low
        absmax = _nf4_absmax(start // BLOCKSIZE, rn < N, qabsmax_ptr, nested_ptr, nested_code_ptr, offset, NESTED)
        w = _nf4_lookup(nib, code) * absmax[:, None]
    else:
        rk = k0 + tl.arange(0, C)
        e = rn64[:, None] * K + rk[None, :]
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        byte = tl.load(packed_ptr + e // 2, mask=mask, other=0).to(tl.int32)
        nib = tl.where(e % 2 == 0, byte >> 4, byte & 0xF)
        w = _nf4_lookup(nib, code) * _nf4_absmax(e // BLOCKSIZE, mask, qabsmax_ptr, nested_ptr, nested_code_ptr,
                                                 offset, NESTED)
    return w.to(DTYPE)


@triton.jit
def _nf4_dequantize_kernel(out_ptr, n, packed_ptr, qabsmax_ptr, nested_ptr, offset_ptr, code_ptr, nested_code_ptr,
                           BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ROWS: tl.constexpr):
    """out[e] = code[nibble e] * absmax[e // BLOCKSIZE] for the ROWS blocks of this program
    (flat indices; n elements in all, any n). Each packed byte is loaded once and each absmax
    decoded once. Takes the NF4Tensor's buffers; out is fp16/bf16/fp32."""
    blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    nbytes = (n + 1) // 2
    byte_idx = blk[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < nbytes, other=0, eviction_policy="evict_first").to(tl.int32)
    nib = tl.interleave(byte >> 4, byte & 0xF)
    absmax = _nf4_absmax(blk, blk * BLOCKSIZE < n, qabsmax_ptr, nested_ptr, nested_code_ptr, tl.load(offset_ptr),
                         NESTED)
    v = _nf4_lookup(nib, _nf4_code(code_ptr)) * absmax[:, None]
    e = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + e, v.to(out_ptr.dtype.element_ty), mask=e < n)


NF4_DEQUANTIZE_WARPS = 4


def _nf4_dequantize_rows(blocksize: int) -> int:
    """Blocks per program of the dequantize kernel: 1024 elements, or one block if larger.
    Measured on an H200 (scripts/tune_kernels.py, benchmarks/kernel_tuning_nvidia-h200.json):
    16 blocks of 64 with 4 warps is 1.5x faster than 32 blocks on Llama-3-8B's four shapes, and
    within 2% of the best of 8..128 blocks x 2/4/8 warps on each."""
    return max(1, 1024 // blocksize)


def nf4_dequantize(t: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = math.prod(t.shape)
    out = torch.empty(t.shape, dtype=dtype, device=t.packed.device)
    if n == 0:
        return out
    rows = _nf4_dequantize_rows(t.blocksize)
    _nf4_dequantize_kernel[(triton.cdiv(triton.cdiv(n, t.blocksize), rows),)](
        out, n, t.packed, t.qabsmax, t.nested_absmax, t.offset, t.code, t.nested_code,
        BLOCKSIZE=t.blocksize, NESTED=NESTED_BLOCKSIZE, ROWS=rows, num_warps=NF4_DEQUANTIZE_WARPS,
        enable_fp_fusion=False)
    return out


@triton.jit
def _nf4_matmul_kernel(a_ptr, out_ptr, ws_ptr, count_ptr, M, N, K, stride_am, stride_ar, stride_om, stride_op,
                       packed_ptr, qabsmax_ptr, nested_ptr, offset_ptr, code_ptr, nested_code_ptr, r_per_split,
                       FORWARD: tl.constexpr, ALIGNED: tl.constexpr, SPLIT: tl.constexpr,
                       BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                       BM: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr):
    """FORWARD: out[M, N] = a[M, K] @ W^T (P = N, reduction R = K). Else the input gradient
    out[M, K] = a[M, N] @ W (P = K, R = N). W [N, K] is the NF4 weight, dequantized tile by
    tile into a's dtype. Program axes: M tiles, P tiles, SPLIT chunks of r_per_split (a
    multiple of BR) of the reduction. With SPLIT > 1, ws [M, P] (float32) and one counter per
    (M, P) tile are the zeroed workspace of `_store_tile`.

    Requires: the tile of W along K (BR forward, BP backward) divides BLOCKSIZE when ALIGNED."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    pid_r = tl.program_id(2)
    if FORWARD:
        P = N
        R = K
    else:
        P = K
        R = N
    rm = pid_m * BM + tl.arange(0, BM)
    rp = pid_p * BP + tl.arange(0, BP)
    code = _nf4_code(code_ptr)
    offset = tl.load(offset_ptr)
    acc = tl.zeros((BM, BP), dtype=tl.float32)
    r_start = pid_r * r_per_split
    r_end = tl.minimum(r_start + r_per_split, R)
    for r0 in range(r_start, r_end, BR):
        rr = r0 + tl.arange(0, BR)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rr[None, :] * stride_ar,
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0, eviction_policy="evict_last")
        if FORWARD:
            w = tl.trans(_nf4_rows(rp, r0, N, K, packed_ptr, qabsmax_ptr, nested_ptr, nested_code_ptr, offset, code,
                                   a.dtype, BLOCKSIZE, NESTED, BR, ALIGNED))
        else:
            w = _nf4_rows(rr, pid_p * BP, N, K, packed_ptr, qabsmax_ptr, nested_ptr, nested_code_ptr, offset, code,
                          a.dtype, BLOCKSIZE, NESTED, BP, ALIGNED)
        acc = _dot(a, w, acc)
    mask = (rm[:, None] < M) & (rp[None, :] < P)
    tile = pid_m * tl.num_programs(1) + pid_p
    _store_tile(acc, out_ptr + rm[:, None] * stride_om + rp[None, :] * stride_op,
                ws_ptr + rm[:, None] * P + rp[None, :], mask, count_ptr + tile, SPLIT)


class NF4Config(NamedTuple):
    BM: int
    BP: int
    BR: int
    num_warps: int
    num_stages: int


def _nf4_config(M: int, blocksize: int, forward: bool) -> NF4Config:
    """Tiles of the NF4 matmul (untuned): the weight tile's extent along K (BR forward, BP for
    the input gradient) is at most one block, so an aligned tile row needs one absmax."""
    kt = min(64, blocksize)
    bm = 16 if M <= SPLIT_K_MAX_M else 64
    return NF4Config(bm, 64 if forward else kt, kt if forward else 64, 4, 3)


def _nf4_mm(a2: torch.Tensor, t: NF4Tensor, forward: bool) -> torch.Tensor:
    N, K = t.shape
    M, R = a2.shape
    P = N if forward else K
    out = torch.empty(M, P, dtype=a2.dtype, device=a2.device)
    if M == 0:
        return out
    if M >= NF4_CUBLAS_MIN_M:
        w = nf4_dequantize(t, a2.dtype)
        return torch.matmul(a2, w.t() if forward else w, out=out)
    cfg = _nf4_config(M, t.blocksize, forward)
    grid_m, grid_p = triton.cdiv(M, cfg.BM), triton.cdiv(P, cfg.BP)
    # Split-K sizing and workspace, shared with w4a16_matmul (`_split_plan` is defined below the
    # kernels: moving a kernel's source lines would invalidate Triton's compile cache for no
    # change of code).
    split, r_per_split, ws, count = _split_plan(M, P, R, grid_m * grid_p, cfg.BR, a2.device)
    _nf4_matmul_kernel[(grid_m, grid_p, split)](
        a2, out, ws, count, M, N, K, a2.stride(0), a2.stride(1), out.stride(0), out.stride(1),
        t.packed, t.qabsmax, t.nested_absmax, t.offset, t.code, t.nested_code, r_per_split,
        FORWARD=forward, ALIGNED=K % t.blocksize == 0, SPLIT=split, BLOCKSIZE=t.blocksize, NESTED=NESTED_BLOCKSIZE,
        BM=cfg.BM, BP=cfg.BP, BR=cfg.BR, num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
    return out


def nf4_matmul(x: torch.Tensor, t: NF4Tensor) -> torch.Tensor:
    """x [..., K] @ W^T: the GEMV for M <= GEMV_MAX_M (`_nf4_gemv`), else `_nf4_mm` (which
    also takes any M from NF4_CUBLAS_MIN_M, checked first as in `w4a16_matmul`)."""
    x2 = x.reshape(-1, x.shape[-1])
    if 0 < x2.shape[0] <= GEMV_MAX_M and x2.shape[0] < NF4_CUBLAS_MIN_M:
        out = torch.empty(x2.shape[0], t.shape[0], dtype=x2.dtype, device=x2.device)
        _nf4_gemv(x2, t, out)
    else:
        out = _nf4_mm(x2, t, forward=True)
    return out.reshape(*x.shape[:-1], t.shape[0])


def nf4_matmul_grad_input(g: torch.Tensor, t: NF4Tensor) -> torch.Tensor:
    g2 = g.reshape(-1, g.shape[-1])
    return _nf4_mm(g2, t, forward=False).reshape(*g.shape[:-1], t.shape[1])


# ---------------------------------------------------------------- W4A16

@triton.jit
def _nibble_shifts(INTERLEAVED: tl.constexpr):
    """Bit shift of value j = 0..7 in its int32 word: 4j, or for AWQ's nibble order
    0 2 4 6 1 3 5 7 the position of j in that order."""
    j = tl.arange(0, 8)
    if INTERLEAVED:
        s = 4 * ((j // 2) + 4 * (j % 2))
    else:
        s = 4 * j
    return s


@triton.jit
def _scale(qz, s, DTYPE: tl.constexpr):
    """(q - z) * s in DTYPE. Both ways round the exact product once, as the twin does (its
    float32 product of a small integer and an fp16/bf16 scale is exact): in DTYPE when the
    scales already are, else in float32 and cast."""
    if s.dtype == DTYPE:
        w = qz.to(DTYPE) * s
    else:
        w = (qz.to(tl.float32) * s.to(tl.float32)).to(DTYPE)
    return w


@triton.jit
def _w4_tile(qweight_ptr, qzeros_ptr, scales_ptr, k0, n0, K, N, stride_qk, stride_qn, stride_zg, stride_zn,
             stride_sg, stride_sn, zero_offset, DTYPE: tl.constexpr, GROUP: tl.constexpr, AWQ: tl.constexpr,
             BK: tl.constexpr, BN: tl.constexpr):
    """The dequantized weight W[k0 : k0 + BK, n0 : n0 + BN] in DTYPE (zero outside W).

    Packed words are loaded once as an int32 tile ([BK/8, BN] GPTQ, [BK, BN/8] AWQ) and
    their nibbles expanded in registers. When GROUP % BK == 0 the tile lies in one group:
    one row of scales [BN] and of zero words [BN/8]. Any other group size (one that is not a
    multiple of 16, so no BK fits inside it) takes the group of each K row.

    Requires: k0 % BK == 0, n0 % BN == 0, BK and BN multiples of 8."""
    rn = n0 + tl.arange(0, BN)
    rk = k0 + tl.arange(0, BK)
    nw = (N + 7) // 8  # words per row of qzeros (and of AWQ's qweight)
    rw = n0 // 8 + tl.arange(0, BN // 8)
    plain = _nibble_shifts(False)
    order = _nibble_shifts(AWQ)  # shifts along N: qzeros of both layouts, AWQ's qweight
    # int32 offsets suffice for the packed tensors: K*N/8 words stay below 2^31 up to K*N = 1.7e10
    # (Llama-3-70B's fused gate_up: 4.7e8); activations and outputs use int64 rows (callers).
    if AWQ:
        word = tl.load(qweight_ptr + rk[:, None] * stride_qk + rw[None, :] * stride_qn,
                       mask=(rk[:, None] < K) & (rw[None, :] < nw), other=0, eviction_policy="evict_first")
        q = tl.reshape((word[:, :, None] >> order[None, None, :]) & 0xF, (BK, BN))
    else:
        rkw = k0 // 8 + tl.arange(0, BK // 8)
        word = tl.load(qweight_ptr + rkw[:, None] * stride_qk + rn[None, :] * stride_qn,
                       mask=(rkw[:, None] < K // 8) & (rn[None, :] < N), other=0, eviction_policy="evict_first")
        q = tl.reshape((word[:, None, :] >> plain[None, :, None]) & 0xF, (BK, BN))
    if GROUP % BK == 0:
        g = k0 // GROUP
        zword = tl.load(qzeros_ptr + g * stride_zg + rw * stride_zn, mask=rw < nw, other=0)
        z = tl.reshape((zword[:, None] >> order[None, :]) & 0xF, (BN,)) + zero_offset
        s = tl.load(scales_ptr + g * stride_sg + rn * stride_sn, mask=rn < N, other=0.0)
        w = _scale(q - z[None, :], s[None, :], DTYPE)
    else:
        gk = rk // GROUP
        kmask = rk[:, None] < K
        zword = tl.load(qzeros_ptr + gk[:, None] * stride_zg + rw[None, :] * stride_zn,
                        mask=kmask & (rw[None, :] < nw), other=0)
        z = tl.reshape((zword[:, :, None] >> order[None, None, :]) & 0xF, (BK, BN)) + zero_offset
        s = tl.load(scales_ptr + gk[:, None] * stride_sg + rn[None, :] * stride_sn,
                    mask=kmask & (rn[None, :] < N), other=0.0)
        w = _scale(q - z, s, DTYPE)
    return w


@triton.jit
def _w4a16_matmul_kernel(x_ptr, perm_ptr, out_ptr, ws_ptr, count_ptr, qweight_ptr, qzeros_ptr, scales_ptr, M, N, K,
                         stride_xm, stride_xk, stride_om, stride_on, stride_qk, stride_qn, stride_zg, stride_zn,
                         stride_sg, stride_sn, zero_offset, k_per_split,
                         GROUP: tl.constexpr, AWQ: tl.constexpr, HAS_PERM: tl.constexpr, SPLIT: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[M, N] = x[M, K][:, perm] @ W[K, N], W the packed 4-bit weight (`_w4_tile`),
    dequantized into x's dtype. HAS_PERM: act-order GPTQ, whose rows were sorted by group at
    load (`kernels.layouts.from_gptq`); x's columns are gathered here through perm (int64 [K]),
    not by a separate launch. Program axes: M tiles, N tiles, SPLIT chunks of k_per_split (a
    multiple of BK) of K; with SPLIT > 1, ws [M, N] float32 and one counter per (M, N) tile
    are the zeroed workspace of `_store_tile`."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BK):
        rk = k0 + tl.arange(0, BK)
        if HAS_PERM:
            xk = tl.load(perm_ptr + rk, mask=rk < K, other=0)
        else:
            xk = rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + xk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0, eviction_policy="evict_last")
        w = _w4_tile(qweight_ptr, qzeros_ptr, scales_ptr, k0, pid_n * BN, K, N, stride_qk, stride_qn, stride_zg,
                     stride_zn, stride_sg, stride_sn, zero_offset, x.dtype, GROUP, AWQ, BK, BN)
        acc = _dot(x, w, acc)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tile = pid_m * tl.num_programs(1) + pid_n
    _store_tile(acc, out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
                ws_ptr + rm[:, None] * N + rn[None, :], mask, count_ptr + tile, SPLIT)


@triton.jit
def _w4a16_dequantize_kernel(out_ptr, perm_ptr, qweight_ptr, qzeros_ptr, scales_ptr, N, K, stride_ok, stride_on,
                             stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, zero_offset,
                             GROUP: tl.constexpr, AWQ: tl.constexpr, HAS_PERM: tl.constexpr,
                             BN: tl.constexpr, BK: tl.constexpr):
    """out [K, N] = W in out's dtype, rows in the checkpoint's order: with HAS_PERM row k of the
    packed (group-sorted) weight goes to row perm[k], so `x @ out` needs no gather of x."""
    k0 = tl.program_id(0) * BK
    n0 = tl.program_id(1) * BN
    w = _w4_tile(qweight_ptr, qzeros_ptr, scales_ptr, k0, n0, K, N, stride_qk, stride_qn, stride_zg, stride_zn,
                 stride_sg, stride_sn, zero_offset, out_ptr.dtype.element_ty, GROUP, AWQ, BK, BN)
    rk = k0 + tl.arange(0, BK)
    rn = n0 + tl.arange(0, BN)
    if HAS_PERM:
        rows = tl.load(perm_ptr + rk, mask=rk < K, other=0)
    else:
        rows = rk.to(tl.int64)
    tl.store(out_ptr + rows[:, None] * stride_ok + rn[None, :] * stride_on, w,
             mask=(rk[:, None] < K) & (rn[None, :] < N))


class W4A16Config(NamedTuple):
    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int


def _w4a16_bk(group_size: int) -> int:
    """The largest K-tile (16..64, a power of two) inside one group; 32 with a per-row group
    when the group is not a multiple of 16 (e.g. 40)."""
    for bk in (64, 32, 16):
        if group_size % bk == 0:
            return bk
    return 32


def _w4a16_config(M: int, group_size: int) -> W4A16Config:
    """Tiles of the W4A16 matmul. Split-K at small M: BM = 16, BN = 256, 4 warps, 4 stages,
    measured on an H200 (scripts/tune_kernels.py over BN 64/128/256 x BK 64/128 x 2/4/8 warps x
    2/4 stages, Llama-3-8B shapes, GPTQ and AWQ, M = 1 and 16): 0.74x the time of the first
    choice (BN = 64, 3 stages) in geometric mean, within 3.4% of each case's best. Above
    SPLIT_K_MAX_M: BM = BN = 64, 3 stages (untuned)."""
    if M <= SPLIT_K_MAX_M:
        return W4A16Config(16, 256, _w4a16_bk(group_size), 4, 4)
    return W4A16Config(64, 64, _w4a16_bk(group_size), 4, 3)


def _w4a16_common(w: W4A16Weight) -> tuple:
    return (w.qweight, w.qzeros, w.scales)


def _w4a16_strides(w: W4A16Weight) -> tuple:
    return (w.qweight.stride(0), w.qweight.stride(1), w.qzeros.stride(0), w.qzeros.stride(1),
            w.scales.stride(0), w.scales.stride(1))


def w4a16_dequantize(w: W4A16Weight, dtype: torch.dtype) -> torch.Tensor:
    """[K, N] in `dtype`, rows in the checkpoint's order (act-order undone): x @ it is the layer."""
    K, N = w.in_features, w.out_features
    out = torch.empty(K, N, dtype=dtype, device=w.qweight.device)
    bk, bn = _w4a16_bk(w.group_size), 64
    _w4a16_dequantize_kernel[(triton.cdiv(K, bk), triton.cdiv(N, bn))](
        out, w.perm if w.perm is not None else w.qweight, *_w4a16_common(w), N, K, out.stride(0), out.stride(1),
        *_w4a16_strides(w), w.zero_offset, GROUP=w.group_size, AWQ=w.layout == "awq", HAS_PERM=w.perm is not None,
        BN=bn, BK=bk, num_warps=4)
    return out


def w4a16_matmul(x: torch.Tensor, w: W4A16Weight) -> torch.Tensor:
    """x [..., K] @ W [K, N] in x's dtype: the GEMV for M <= GEMV_MAX_M, split-K up to
    SPLIT_K_MAX_M (both one launch), a tiled GEMM up to W4A16_CUBLAS_MIN_M, dequantize + cuBLAS
    from there."""
    x2 = x.reshape(-1, x.shape[-1])
    M, K, N = x2.shape[0], w.in_features, w.out_features
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M >= W4A16_CUBLAS_MIN_M:
        torch.matmul(x2, w4a16_dequantize(w, x.dtype), out=out)
    elif 0 < M <= GEMV_MAX_M:
        _w4a16_gemv(x2, w, out)
    elif M > 0:
        cfg = _w4a16_config(M, w.group_size)
        grid_m, grid_n = triton.cdiv(M, cfg.BM), triton.cdiv(N, cfg.BN)
        split, k_per_split, ws, count = _split_plan(M, N, K, grid_m * grid_n, cfg.BK, x.device)
        _w4a16_matmul_kernel[(grid_m, grid_n, split)](
            x2, w.perm if w.perm is not None else w.qweight, out, ws, count, *_w4a16_common(w), M, N, K,
            x2.stride(0), x2.stride(1), out.stride(0), out.stride(1), *_w4a16_strides(w), w.zero_offset, k_per_split,
            GROUP=w.group_size, AWQ=w.layout == "awq", HAS_PERM=w.perm is not None, SPLIT=split,
            BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.reshape(*x.shape[:-1], N)



def _split_plan(M: int, P: int, R: int, out_tiles: int, tile: int, device: torch.device) -> tuple:
    """(splits, reduction length per split, workspace, counters) of a matmul [M, R] x [R, P]
    tiled into `out_tiles` output tiles and reduction tiles of `tile`: split-K for M <=
    SPLIT_K_MAX_M, every split a whole number of tiles, no split left empty."""
    red_tiles = triton.cdiv(R, tile)
    split = _split_k(out_tiles, red_tiles, device) if M <= SPLIT_K_MAX_M else 1
    per_split = triton.cdiv(red_tiles, split) * tile
    split = triton.cdiv(R, per_split)
    ws, count = _workspace(device, M * P if split > 1 else 0, out_tiles if split > 1 else 0)
    return split, per_split, ws, count

# ---------------------------------------------------------------- GEMV for M <= GEMV_MAX_M
#
# Decoding reads each weight once per token: the time is the weight's bytes over the memory
# bandwidth, and the split-K GEMM above wastes most of a 16-row `tl.dot` tile at M = 1 (it ran
# at parity with bf16 on an H200). The GEMV kernels below follow the fast 4-bit GEMVs
# (docs/kernels.md#anchors): every packed word or byte is loaded once and its nibbles are
# expanded in registers, scales / zeros / absmax once per group or block row, the M rows
# (padded to BM in {1, 4, 16}) are multiplied in float32 with no tensor cores and no padded
# rows in the weight stream, and K is split across programs so that small layers still fill
# the GPU (`_split_k`: about two waves of the SM count, from the device properties).
#
# Reduction: each thread keeps its own float32 partial sums through the K loop, in the
# register layout the packed tile was loaded in (GPTQ: one nibble position of every word at a
# time, [BM, BK/8, BN]; AWQ: [BM, BK, BN/8, 8]; NF4: the high and low nibble halves,
# [BM, BN, BK/2]), so the loop body is loads and FMAs; the `tl.sum` across threads and warps
# runs once, after the loop (a `tl.sum` per step compiled to a shared-memory reduction per
# step).
#
# One launch per call: the split partial sums go through `_store_tile`'s float32 workspace,
# which the last program of each tile reads and re-zeroes (no memset, no cast kernel; a
# two-pass reduction would need a second launch). Act-order GPTQ keeps the group-sorted rows
# of `kernels.layouts.from_gptq`, so scales and zeros stay one row per group; each K row's
# source column is loaded from `perm` inside the kernel and x is gathered through it (a
# per-row index load, rather than gathering a [BK, BN] scale tile per row by g_idx).
#
# None of these tiles has been timed on a GPU yet (scripts/tune_kernels.py sweeps them).

# Activations with at most this many rows take the GEMV (M padded to BM = 1, 4 or 16 rows).
GEMV_MAX_M = 16
# float32 partial sums each thread keeps through the K loop: 32 (so 32 x 32 per warp).
GEMV_ACC_PER_WARP = 32 * 32


class GemvConfig(NamedTuple):
    BM: int
    BN: int
    BK: int
    num_warps: int


def _gemv_bm(M: int) -> int:
    """Rows of the GEMV's register tile: three sizes, so three compiled variants per path."""
    return 1 if M <= 1 else 4 if M <= 4 else 16


def _gemv_warps(bm: int) -> int:
    return 8 if bm == 16 else 4


def _gemv_bk(group: int, bk_max: int) -> int:
    """The K-tile: the largest power of two up to bk_max that divides the group (one scale
    row per tile), unless that is below min(bk_max, 32); then bk_max (at most 64) with each
    row's own group, as for groups like 40 or 48."""
    bk = bk_max
    while bk > 8 and group % bk:
        bk //= 2
    return bk if group % bk == 0 and bk >= min(bk_max, 32) else min(bk_max, 64)


def _w4a16_gemv_config(M: int, group_size: int, awq: bool) -> GemvConfig:
    """Tiles of the W4A16 GEMV (untuned: not yet measured on a GPU), sized by the partial sums
    a thread keeps (GEMV_ACC_PER_WARP), K-tile at most 128. GPTQ: BN = 64 (a warp reads 64
    consecutive words of a K-row of words), partial sums [BM, BK/8, BN]. AWQ: its words run
    along N, so BN = 128 (16 words of a K row) up to BM = 4, 64 above; partial sums
    [BM, BK, BN] (the nibbles are not looped over: they are columns)."""
    bm = _gemv_bm(M)
    warps = _gemv_warps(bm)
    budget = GEMV_ACC_PER_WARP * warps
    if awq:
        bn = 128 if bm <= 4 else 64
        bk_max = budget // (bm * bn)
    else:
        bn = 64
        bk_max = 8 * budget // (bm * bn)
    return GemvConfig(bm, bn, _gemv_bk(group_size, max(8, min(128, bk_max))), warps)


def _nf4_gemv_config(M: int, blocksize: int) -> GemvConfig:
    """Tiles of the NF4 GEMV (untuned): BK = the block, at most 128 (one absmax per weight row
    and tile); BN from the partial sums a thread keeps ([BM, BN, BK/2]), at least 8."""
    bm = _gemv_bm(M)
    warps = _gemv_warps(bm)
    bk = min(128, blocksize)
    return GemvConfig(bm, max(8, GEMV_ACC_PER_WARP * warps // (bm * bk // 2)), bk, warps)


@triton.jit
def _gemv_x(x_ptr, perm_ptr, rm, rk, M, K, stride_xm, stride_xk, HAS_PERM: tl.constexpr):
    """float32 x[rm, rk] (or x[rm, perm[rk]]) for K indices rk of any shape, rm already shaped
    to broadcast in front of them; zero outside x."""
    kmask = rk < K
    if HAS_PERM:
        xk = tl.load(perm_ptr + rk, mask=kmask, other=0)
    else:
        xk = rk
    x = tl.load(x_ptr + rm * stride_xm + xk[None] * stride_xk, mask=(rm < M) & kmask[None], other=0.0,
                eviction_policy="evict_last")
    return x.to(tl.float32)


@triton.jit
def _gemv_gptq_step(acc, x_ptr, perm_ptr, qweight_ptr, qzeros_ptr, scales_ptr, k0, n0, M, N, K, stride_xm,
                    stride_xk, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, zero_offset,
                    GROUP: tl.constexpr, HAS_PERM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr):
    """acc [BM, BK/8, BN] plus the products of x[:, k0 : k0 + BK] and W[k0 : k0 + BK, n0 : n0 + BN],
    GPTQ layout: the words [BK/8, BN] are loaded once, then nibble j of every word (K rows
    k0 + 8r + j) is taken in turn, in the words' own register layout, and multiplied by the
    matching x column. Nothing is reduced here: each thread keeps its partial sums."""
    DTYPE = x_ptr.dtype.element_ty
    rw = k0 // 8 + tl.arange(0, BK // 8)
    rn = n0 + tl.arange(0, BN)
    word = tl.load(qweight_ptr + rw[:, None] * stride_qk + rn[None, :] * stride_qn,
                   mask=(rw[:, None] < K // 8) & (rn[None, :] < N), other=0, eviction_policy="evict_first")
    zshift = (rn % 8) * 4  # qzeros: column n in nibble n % 8 of word n // 8
    if GROUP % BK == 0:  # one group: one row of scales and zeros for the whole tile
        g = k0 // GROUP
        zword = tl.load(qzeros_ptr + g * stride_zg + (rn // 8) * stride_zn, mask=rn < N, other=0)
        z = (((zword >> zshift) & 0xF) + zero_offset)[None, :]
        s = tl.load(scales_ptr + g * stride_sg + rn * stride_sn, mask=rn < N, other=0.0)[None, :]
    for j in tl.static_range(8):
        rk = rw * 8 + j
        x = _gemv_x(x_ptr, perm_ptr, tl.arange(0, BM)[:, None], rk, M, K, stride_xm, stride_xk, HAS_PERM)
        if GROUP % BK != 0:  # each K row's own group
            gk = (rk // GROUP)[:, None]
            gmask = (rk < K)[:, None] & (rn < N)[None, :]
            zword = tl.load(qzeros_ptr + gk * stride_zg + (rn // 8)[None, :] * stride_zn, mask=gmask, other=0)
            z = ((zword >> zshift[None, :]) & 0xF) + zero_offset
            s = tl.load(scales_ptr + gk * stride_sg + rn[None, :] * stride_sn, mask=gmask, other=0.0)
        w = _scale(((word >> (4 * j)) & 0xF) - z, s, DTYPE)
        acc += x[:, :, None] * w.to(tl.float32)[None, :, :]
    return acc


@triton.jit
def _gemv_awq_step(acc, x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, k0, n0, M, N, K, stride_xm, stride_xk,
                   stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, zero_offset,
                   GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """acc [BM, BK, BN/8, 8] plus the products of x[:, k0 : k0 + BK] and W[k0 : k0 + BK, n0 : n0 + BN],
    AWQ layout: the words [BK, BN/8] are loaded once and unpacked to [BK, BN/8, 8] (column
    8c + j of word column c sits at the shift of j in the order 0 2 4 6 1 3 5 7), which
    extends the words' layout by an in-thread dimension. Nothing is reduced here."""
    DTYPE = x_ptr.dtype.element_ty
    rk = k0 + tl.arange(0, BK)
    rc = n0 // 8 + tl.arange(0, BN // 8)
    rn = rc[:, None] * 8 + tl.arange(0, 8)[None, :]  # [BN/8, 8]
    nw = (N + 7) // 8
    order = _nibble_shifts(True)
    x = _gemv_x(x_ptr, x_ptr, tl.arange(0, BM)[:, None], rk, M, K, stride_xm, stride_xk, False)
    word = tl.load(qweight_ptr + rk[:, None] * stride_qk + rc[None, :] * stride_qn,
                   mask=(rk[:, None] < K) & (rc[None, :] < nw), other=0, eviction_policy="evict_first")
    q = (word[:, :, None] >> order[None, None, :]) & 0xF
    if GROUP % BK == 0:
        g = k0 // GROUP
        zword = tl.load(qzeros_ptr + g * stride_zg + rc * stride_zn, mask=rc < nw, other=0)
        z = ((zword[:, None] >> order[None, :]) & 0xF) + zero_offset
        s = tl.load(scales_ptr + g * stride_sg + rn * stride_sn, mask=rn < N, other=0.0)
        w = _scale(q - z[None, :, :], s[None, :, :], DTYPE)
    else:
        gk = rk // GROUP
        kmask = rk < K
        zword = tl.load(qzeros_ptr + gk[:, None] * stride_zg + rc[None, :] * stride_zn,
                        mask=kmask[:, None] & (rc[None, :] < nw), other=0)
        z = ((zword[:, :, None] >> order[None, None, :]) & 0xF) + zero_offset
        s = tl.load(scales_ptr + gk[:, None, None] * stride_sg + rn[None, :, :] * stride_sn,
                    mask=kmask[:, None, None] & (rn < N)[None, :, :], other=0.0)
        w = _scale(q - z, s, DTYPE)
    return acc + x[:, :, None, None] * w.to(tl.float32)[None, :, :, :]


@triton.jit
def _w4a16_gemv_kernel(x_ptr, perm_ptr, out_ptr, ws_ptr, count_ptr, qweight_ptr, qzeros_ptr, scales_ptr, M, N, K,
                       stride_xm, stride_xk, stride_om, stride_on, stride_qk, stride_qn, stride_zg, stride_zn,
                       stride_sg, stride_sn, zero_offset, k_per_split,
                       GROUP: tl.constexpr, AWQ: tl.constexpr, HAS_PERM: tl.constexpr, SPLIT: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[M, N] = x[M, K][:, perm] @ W[K, N] for M <= BM, W packed 4-bit (GPTQ or AWQ layout).
    Program axes: N tiles of BN, SPLIT chunks of k_per_split (a multiple of BK) of K; with
    SPLIT > 1, ws [M, N] float32 and one counter per N tile are `_store_tile`'s workspace."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BN
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # the partial sums stay per thread through the loop (plain FMAs on the weights' register
    # layout); the one reduction across threads and warps is after it
    if AWQ:
        acc = tl.zeros((BM, BK, BN // 8, 8), dtype=tl.float32)
        for k0 in range(k_start, k_end, BK):
            acc = _gemv_awq_step(acc, x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, k0, n0, M, N, K, stride_xm,
                                 stride_xk, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
                                 zero_offset, GROUP, BM, BN, BK)
        acc2 = tl.reshape(tl.sum(acc, axis=1), (BM, BN))
    else:
        acc = tl.zeros((BM, BK // 8, BN), dtype=tl.float32)
        for k0 in range(k_start, k_end, BK):
            acc = _gemv_gptq_step(acc, x_ptr, perm_ptr, qweight_ptr, qzeros_ptr, scales_ptr, k0, n0, M, N, K,
                                  stride_xm, stride_xk, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg,
                                  stride_sn, zero_offset, GROUP, HAS_PERM, BM, BN, BK)
        acc2 = tl.sum(acc, axis=1)
    rm = tl.arange(0, BM)
    rn = n0 + tl.arange(0, BN)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    _store_tile(acc2, out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
                ws_ptr + rm[:, None] * N + rn[None, :], mask, count_ptr + pid_n, SPLIT)


def _w4a16_gemv(x2: torch.Tensor, w: W4A16Weight, out: torch.Tensor) -> None:
    """out = x2 @ W for 0 < M <= GEMV_MAX_M: one launch."""
    M, K, N = x2.shape[0], w.in_features, w.out_features
    awq = w.layout == "awq"
    cfg = _w4a16_gemv_config(M, w.group_size, awq)
    grid_n = triton.cdiv(N, cfg.BN)
    split, k_per_split, ws, count = _split_plan(M, N, K, grid_n, cfg.BK, x2.device)
    _w4a16_gemv_kernel[(grid_n, split)](
        x2, w.perm if w.perm is not None else w.qweight, out, ws, count, *_w4a16_common(w), M, N, K,
        x2.stride(0), x2.stride(1), out.stride(0), out.stride(1), *_w4a16_strides(w), w.zero_offset, k_per_split,
        GROUP=w.group_size, AWQ=awq, HAS_PERM=w.perm is not None, SPLIT=split, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK,
        num_warps=cfg.num_warps)


@triton.jit
def _nf4_gemv_halves(rn, k0, N, K, packed_ptr, qabsmax_ptr, nested_ptr, nested_code_ptr, offset, code,
                     DTYPE: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BK: tl.constexpr):
    """float32 (W[rn, k0 + 2i], W[rn, k0 + 2i + 1]) for i < BK/2, each [BN, BK/2], rounded to
    DTYPE as the twin's weight is: the high and low nibbles of one [BN, BK/2] load of bytes
    (each byte once), one absmax per row (the tile lies in one block), the code from registers.
    Requires K % BLOCKSIZE == 0, BK dividing BLOCKSIZE, k0 % BK == 0."""
    start = rn.to(tl.int64) * K + k0
    byte = tl.load(packed_ptr + (start // 2)[:, None] + tl.arange(0, BK // 2)[None, :], mask=(rn < N)[:, None],
                   other=0, eviction_policy="evict_first").to(tl.int32)
    absmax = _nf4_absmax(start // BLOCKSIZE, rn < N, qabsmax_ptr, nested_ptr, nested_code_ptr, offset, NESTED)
    hi = (_nf4_lookup(byte >> 4, code) * absmax[:, None]).to(DTYPE).to(tl.float32)
    lo = (_nf4_lookup(byte & 0xF, code) * absmax[:, None]).to(DTYPE).to(tl.float32)
    return hi, lo


@triton.jit
def _nf4_gemv_kernel(x_ptr, out_ptr, ws_ptr, count_ptr, M, N, K, stride_xm, stride_xk, stride_om, stride_on,
                     packed_ptr, qabsmax_ptr, nested_ptr, offset_ptr, code_ptr, nested_code_ptr, k_per_split,
                     ALIGNED: tl.constexpr, SPLIT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[M, N] = x[M, K] @ W^T for M <= BM, W [N, K] in NF4 (the forward of `LinearNF4`).
    ALIGNED (K % BLOCKSIZE == 0): `_nf4_gemv_halves`, x loaded as its even and odd columns;
    otherwise each element finds its byte and block (`_nf4_rows`). Program axes and workspace
    as `_w4a16_gemv_kernel`."""
    DTYPE = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    code = _nf4_code(code_ptr)
    offset = tl.load(offset_ptr)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    # per-thread partial sums through the loop, one reduction after it (as the W4A16 GEMV)
    if ALIGNED:
        acc3 = tl.zeros((BM, BN, BK // 2), dtype=tl.float32)
        for k0 in range(k_start, k_end, BK):
            hi, lo = _nf4_gemv_halves(rn, k0, N, K, packed_ptr, qabsmax_ptr, nested_ptr, nested_code_ptr, offset,
                                      code, DTYPE, BLOCKSIZE, NESTED, BK)
            ke = k0 + 2 * tl.arange(0, BK // 2)
            xe = _gemv_x(x_ptr, x_ptr, rm[:, None], ke, M, K, stride_xm, stride_xk, False)
            xo = _gemv_x(x_ptr, x_ptr, rm[:, None], ke + 1, M, K, stride_xm, stride_xk, False)
            acc3 += xe[:, None, :] * hi[None, :, :] + xo[:, None, :] * lo[None, :, :]
    else:
        acc3 = tl.zeros((BM, BN, BK), dtype=tl.float32)
        for k0 in range(k_start, k_end, BK):
            w = _nf4_rows(rn, k0, N, K, packed_ptr, qabsmax_ptr, nested_ptr, nested_code_ptr, offset, code, DTYPE,
                          BLOCKSIZE, NESTED, BK, False).to(tl.float32)
            x = _gemv_x(x_ptr, x_ptr, rm[:, None], k0 + tl.arange(0, BK), M, K, stride_xm, stride_xk, False)
            acc3 += x[:, None, :] * w[None, :, :]
    acc = tl.sum(acc3, axis=2)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    _store_tile(acc, out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
                ws_ptr + rm[:, None] * N + rn[None, :], mask, count_ptr + pid_n, SPLIT)


def _nf4_gemv(x2: torch.Tensor, t: NF4Tensor, out: torch.Tensor) -> None:
    """out = x2 @ W^T for 0 < M <= GEMV_MAX_M: one launch."""
    N, K = t.shape
    M = x2.shape[0]
    cfg = _nf4_gemv_config(M, t.blocksize)
    grid_n = triton.cdiv(N, cfg.BN)
    split, k_per_split, ws, count = _split_plan(M, N, K, grid_n, cfg.BK, x2.device)
    _nf4_gemv_kernel[(grid_n, split)](
        x2, out, ws, count, M, N, K, x2.stride(0), x2.stride(1), out.stride(0), out.stride(1),
        t.packed, t.qabsmax, t.nested_absmax, t.offset, t.code, t.nested_code, k_per_split,
        ALIGNED=K % t.blocksize == 0, SPLIT=split, BLOCKSIZE=t.blocksize, NESTED=NESTED_BLOCKSIZE,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, num_warps=cfg.num_warps, enable_fp_fusion=False)


# ---------------------------------------------------------------- compile-only configurations

# Group sizes compiled: a K-tile of 64, 32, 16 inside one group (128, 32, 48), a group that is
# not a multiple of 16 (40: each row's group), and one group per row ("group_size: -1") of
# Llama-3-8B's down projection (14336, the same path as 128 with another constant).
COMPILED_GROUPS = (128, 32, 48, 40, 14336)
# (activation, scales) dtypes: each pair takes its own dequantization path (`_scale`).
COMPILED_DTYPES = (("fp16", "fp16"), ("bf16", "fp16"), ("bf16", "bf16"), ("fp16", "bf16"), ("fp32", "fp16"))
# NF4 block sizes compiled: 32 and 64 set the K extent of the weight tile; 4096 (the largest
# quant/nf4.ALLOWED_BLOCKSIZES) has several tiles per block.
COMPILED_BLOCKSIZES = (64, 32, 4096)


class LaunchConfig(NamedTuple):
    """One launch configuration, for `triton.compile(ASTSource(kernel, signature, constexprs,
    attrs), target=..., options=options)`."""
    name: str
    kernel: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


def _config(name, kernel, signature: dict, constexprs: dict, options: dict, unit_strides: str) -> LaunchConfig:
    """As the launch with contiguous tensors compiles it: Triton specializes integer arguments
    equal to 1 into constants (the unit strides) and marks 16-byte-aligned pointers (every
    fresh torch allocation) divisible by 16, which decides how loads vectorize."""
    signature = dict(signature)
    constexprs = dict(constexprs)
    for stride in unit_strides.split():
        signature[stride] = "constexpr"
        constexprs[stride] = 1
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items() if t.startswith("*")}
    return LaunchConfig(name, kernel, signature, constexprs, attrs, options)


def _sig(names: str, kind: str) -> dict:
    return {n: kind for n in names.split()}


def launch_configs():
    """Every launch configuration the wrappers above can choose (tiles, split-K or not, group
    and block paths, dtypes), for compile-only checks of shared memory and compiler crashes
    without a GPU. The tiles come from the same `_nf4_config` / `_w4a16_config` / `_w4a16_bk`
    the wrappers call; SPLIT = 2 stands for any split above 1 (it only changes a constant)."""
    nf4_bufs = {"packed_ptr": "*u8", "qabsmax_ptr": "*u8", "nested_ptr": "*fp32", "offset_ptr": "*fp32",
                "code_ptr": "*fp32", "nested_code_ptr": "*fp32"}
    for act in ("fp16", "bf16", "fp32"):
        for blocksize in (64, 4096):
            sig = {"out_ptr": f"*{act}", "n": "i32", **nf4_bufs, **_sig("BLOCKSIZE NESTED ROWS", "constexpr")}
            yield _config(f"nf4_dequantize -> {act} blocksize={blocksize}", _nf4_dequantize_kernel, sig,
                          {"BLOCKSIZE": blocksize, "NESTED": NESTED_BLOCKSIZE, "ROWS": _nf4_dequantize_rows(blocksize)},
                          {"num_warps": NF4_DEQUANTIZE_WARPS, "enable_fp_fusion": False}, "")
        for forward in (True, False):
            for m in (1, SPLIT_K_MAX_M + 1):
                for blocksize in COMPILED_BLOCKSIZES:
                    for aligned in (True, False):
                        cfg = _nf4_config(m, blocksize, forward)
                        sig = {"a_ptr": f"*{act}", "out_ptr": f"*{act}", "ws_ptr": "*fp32", "count_ptr": "*i32",
                               **_sig("M N K stride_am stride_ar stride_om stride_op", "i32"), **nf4_bufs,
                               "r_per_split": "i32",
                               **_sig("FORWARD ALIGNED SPLIT BLOCKSIZE NESTED BM BP BR", "constexpr")}
                        yield _config(
                            f"nf4_matmul {'fwd' if forward else 'grad'} {act} M={m} blocksize={blocksize}"
                            f"{'' if aligned else ' unaligned'}", _nf4_matmul_kernel, sig,
                            {"FORWARD": forward, "ALIGNED": aligned, "SPLIT": 2 if m <= SPLIT_K_MAX_M else 1,
                             "BLOCKSIZE": blocksize, "NESTED": NESTED_BLOCKSIZE, "BM": cfg.BM, "BP": cfg.BP,
                             "BR": cfg.BR},
                            {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": False},
                            "stride_ar stride_op")
    w4_strides = "stride_qk stride_qn stride_zg stride_zn stride_sg stride_sn zero_offset"
    for act, sc in COMPILED_DTYPES:
        for awq in (False, True):
            for group in COMPILED_GROUPS:
                for has_perm in ((False, True) if not awq and group == 128 else (False,)):
                    perm = "*i64" if has_perm else "*i32"
                    what = f"{'awq' if awq else 'gptq'}{' act-order' if has_perm else ''}"
                    for m in (1, SPLIT_K_MAX_M + 1):
                        cfg = _w4a16_config(m, group)
                        sig = {"x_ptr": f"*{act}", "perm_ptr": perm, "out_ptr": f"*{act}", "ws_ptr": "*fp32",
                               "count_ptr": "*i32", "qweight_ptr": "*i32", "qzeros_ptr": "*i32",
                               "scales_ptr": f"*{sc}",
                               **_sig(f"M N K stride_xm stride_xk stride_om stride_on {w4_strides} k_per_split", "i32"),
                               **_sig("GROUP AWQ HAS_PERM SPLIT BM BN BK", "constexpr")}
                        yield _config(
                            f"w4a16 {what} {act} x {sc} scales g{group} M={m}", _w4a16_matmul_kernel, sig,
                            {"GROUP": group, "AWQ": awq, "HAS_PERM": has_perm, "SPLIT": 2 if m <= SPLIT_K_MAX_M else 1,
                             "BM": cfg.BM, "BN": cfg.BN, "BK": cfg.BK},
                            {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                            "stride_xk stride_on stride_qn stride_zn stride_sn")
                    # the dequantize + cuBLAS path, into the activation dtype
                    sig = {"out_ptr": f"*{act}", "perm_ptr": perm, "qweight_ptr": "*i32", "qzeros_ptr": "*i32",
                           "scales_ptr": f"*{sc}", **_sig(f"N K stride_ok stride_on {w4_strides}", "i32"),
                           **_sig("GROUP AWQ HAS_PERM BN BK", "constexpr")}
                    yield _config(
                        f"w4a16_dequantize {what} -> {act}, {sc} scales g{group}", _w4a16_dequantize_kernel, sig,
                        {"GROUP": group, "AWQ": awq, "HAS_PERM": has_perm, "BN": 64, "BK": _w4a16_bk(group)},
                        {"num_warps": 4}, "stride_on stride_qn stride_zn stride_sn")
    yield from _gemv_launch_configs()


# Groups and block sizes that reach every GEMV tile `_w4a16_gemv_config` / `_nf4_gemv_config`
# choose (test_compile.py checks the wrappers' choices against them): per GEMV row count, each
# K-tile inside one group (128, 64, 32, 16) and each row's own group (16 and 8: groups
# smaller than the K-tile). Block sizes 256..4096 take the tiles of 128.
GEMV_COMPILED_GROUPS = (128, 64, 32, 16, 8)
GEMV_COMPILED_BLOCKSIZES = (64, 32, 128)
GEMV_COMPILED_MS = (1, 4, GEMV_MAX_M)


def _gemv_launch_configs():
    """The GEMV launches: every distinct tile (and group path) with fp16 and bf16 activations
    and scales; the other activation/scale pairs and act-order on the common group 128."""
    w4_strides = "stride_qk stride_qn stride_zg stride_zn stride_sg stride_sn zero_offset"
    for act, sc in COMPILED_DTYPES:
        full = (act, sc) in (("fp16", "fp16"), ("bf16", "bf16"))
        for awq in (False, True):
            seen = set()
            for group in GEMV_COMPILED_GROUPS if full else (128,):
                for has_perm in ((False, True) if not awq and group == 128 else (False,)):
                    for m in GEMV_COMPILED_MS:
                        cfg = _w4a16_gemv_config(m, group, awq)
                        key = (cfg, group % cfg.BK == 0, has_perm)
                        if key in seen:
                            continue
                        seen.add(key)
                        what = f"{'awq' if awq else 'gptq'}{' act-order' if has_perm else ''}"
                        sig = {"x_ptr": f"*{act}", "perm_ptr": "*i64" if has_perm else "*i32", "out_ptr": f"*{act}",
                               "ws_ptr": "*fp32", "count_ptr": "*i32", "qweight_ptr": "*i32", "qzeros_ptr": "*i32",
                               "scales_ptr": f"*{sc}",
                               **_sig(f"M N K stride_xm stride_xk stride_om stride_on {w4_strides} k_per_split", "i32"),
                               **_sig("GROUP AWQ HAS_PERM SPLIT BM BN BK", "constexpr")}
                        yield _config(
                            f"w4a16_gemv {what} {act} x {sc} scales g{group} BM={cfg.BM}", _w4a16_gemv_kernel, sig,
                            {"GROUP": group, "AWQ": awq, "HAS_PERM": has_perm, "SPLIT": 2, "BM": cfg.BM,
                             "BN": cfg.BN, "BK": cfg.BK},
                            {"num_warps": cfg.num_warps}, "stride_xk stride_on stride_qn stride_zn stride_sn")
    nf4_bufs = {"packed_ptr": "*u8", "qabsmax_ptr": "*u8", "nested_ptr": "*fp32", "offset_ptr": "*fp32",
                "code_ptr": "*fp32", "nested_code_ptr": "*fp32"}
    for act in ("fp16", "bf16", "fp32"):
        for blocksize in GEMV_COMPILED_BLOCKSIZES if act != "fp32" else (64,):
            for aligned in (True, False):
                for m in GEMV_COMPILED_MS:
                    cfg = _nf4_gemv_config(m, blocksize)
                    sig = {"x_ptr": f"*{act}", "out_ptr": f"*{act}", "ws_ptr": "*fp32", "count_ptr": "*i32",
                           **_sig("M N K stride_xm stride_xk stride_om stride_on", "i32"), **nf4_bufs,
                           "k_per_split": "i32", **_sig("ALIGNED SPLIT BLOCKSIZE NESTED BM BN BK", "constexpr")}
                    yield _config(
                        f"nf4_gemv {act} blocksize={blocksize}{'' if aligned else ' unaligned'} BM={cfg.BM}",
                        _nf4_gemv_kernel, sig,
                        {"ALIGNED": aligned, "SPLIT": 2, "BLOCKSIZE": blocksize, "NESTED": NESTED_BLOCKSIZE,
                         "BM": cfg.BM, "BN": cfg.BN, "BK": cfg.BK},
                        {"num_warps": cfg.num_warps, "enable_fp_fusion": False}, "stride_xk stride_on")
