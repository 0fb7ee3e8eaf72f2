"""Triton kernels: NF4 dequantize, NF4 matmul (forward and input gradient), W4A16 matmul.

Every kernel computes in float32 registers and casts only at the store (bf16 arithmetic is
wrong under TRITON_INTERPRET, and fp32 accumulation is what the tests hold the kernels to).
Launch configurations are explicit (no autotune: it does not run in the interpreter); the
wrappers pick them from the shape.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.layouts import W4A16Weight
from quant.nf4 import NESTED_BLOCKSIZE, NF4Tensor

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# ---------------------------------------------------------------- NF4

@triton.jit
def _nf4_values(e, mask, packed_ptr, qabsmax_ptr, nested_ptr, offset_ptr, code_ptr, nested_code_ptr,
                BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """float32 values of the NF4 elements at flat indices `e` (any shape): the high nibble of
    byte e // 2 for even e, the low one for odd e; absmax decoded from its 8-bit code inside
    (the offset is read from device memory: no host sync per call)."""
    byte = tl.load(packed_ptr + e // 2, mask=mask, other=0).to(tl.int32)
    nib = tl.where(e % 2 == 0, byte >> 4, byte & 0xF)
    v = tl.load(code_ptr + nib, mask=mask, other=0.0)
    blk = e // BLOCKSIZE
    qa = tl.load(qabsmax_ptr + blk, mask=mask, other=0).to(tl.int32)
    absmax = tl.load(nested_code_ptr + qa, mask=mask, other=0.0) * tl.load(nested_ptr + blk // NESTED, mask=mask,
                                                                            other=0.0) + tl.load(offset_ptr)
    return v * absmax


@triton.jit
def _nf4_dequantize_kernel(out_ptr, n, packed_ptr, qabsmax_ptr, nested_ptr, offset_ptr, code_ptr, nested_code_ptr,
                           BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n
    v = _nf4_values(e, mask, packed_ptr, qabsmax_ptr, nested_ptr, offset_ptr, code_ptr, nested_code_ptr, BLOCKSIZE, NESTED)
    tl.store(out_ptr + e, v.to(out_ptr.dtype.element_ty), mask=mask)


def nf4_dequantize(t: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = 1
    for s in t.shape:
        n *= s
    out = torch.empty(t.shape, dtype=dtype, device=t.packed.device)
    BLOCK = 1024
    _nf4_dequantize_kernel[(triton.cdiv(n, BLOCK),)](
        out, n, t.packed, t.qabsmax, t.nested_absmax, t.offset, t.code, t.nested_code,
        BLOCKSIZE=t.blocksize, NESTED=NESTED_BLOCKSIZE, BLOCK=BLOCK)
    return out


@triton.jit
def _nf4_matmul_kernel(a_ptr, c_ptr, M, P, R, stride_am, stride_ar, stride_cm, stride_cp,
                       stride_er, stride_ep, packed_ptr, qabsmax_ptr, nested_ptr, offset_ptr, code_ptr, nested_code_ptr,
                       BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                       BM: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr):
    """C[M, P] = A[M, R] @ B[R, P], with B[r, p] the NF4 element at flat index
    r * stride_er + p * stride_ep: B = W^T for the forward (W [N, K] row-major: stride_er = 1,
    stride_ep = K), B = W for the input gradient (stride_er = K, stride_ep = 1)."""
    pid_m, pid_p = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rp = pid_p * BP + tl.arange(0, BP)
    acc = tl.zeros((BM, BP), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rr[None, :] * stride_ar,
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0).to(tl.float32)
        e = rr[:, None] * stride_er + rp[None, :] * stride_ep
        b = _nf4_values(e, (rr[:, None] < R) & (rp[None, :] < P), packed_ptr, qabsmax_ptr, nested_ptr, offset_ptr,
                        code_ptr, nested_code_ptr, BLOCKSIZE, NESTED)
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * stride_cm + rp[None, :] * stride_cp, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rp[None, :] < P))


def _nf4_mm(a2: torch.Tensor, t: NF4Tensor, transpose_w: bool) -> torch.Tensor:
    N, K = t.shape
    M, R = a2.shape
    P = N if transpose_w else K
    stride_er, stride_ep = (1, K) if transpose_w else (K, 1)
    c = torch.empty(M, P, dtype=a2.dtype, device=a2.device)
    BM = 16 if M <= 16 else 64
    BP, BR = 64, 32
    _nf4_matmul_kernel[(triton.cdiv(M, BM), triton.cdiv(P, BP))](
        a2, c, M, P, R, a2.stride(0), a2.stride(1), c.stride(0), c.stride(1), stride_er, stride_ep,
        t.packed, t.qabsmax, t.nested_absmax, t.offset, t.code, t.nested_code,
        BLOCKSIZE=t.blocksize, NESTED=NESTED_BLOCKSIZE, BM=BM, BP=BP, BR=BR)
    return c


def nf4_matmul(x: torch.Tensor, t: NF4Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return _nf4_mm(x2, t, transpose_w=True).reshape(*x.shape[:-1], t.shape[0])


def nf4_matmul_grad_input(g: torch.Tensor, t: NF4Tensor) -> torch.Tensor:
    g2 = g.reshape(-1, g.shape[-1])
    return _nf4_mm(g2, t, transpose_w=False).reshape(*g.shape[:-1], t.shape[1])


# ---------------------------------------------------------------- W4A16

@triton.jit
def _w4_tile(qweight_ptr, qzeros_ptr, scales_ptr, rk, rn, K, N, stride_qk, stride_qn, stride_zg, stride_zn,
             stride_sg, stride_sn, zero_offset, GROUP: tl.constexpr, AWQ: tl.constexpr):
    """float32 [BK, BN] tile of the dequantized weight at rows rk, columns rn."""
    mask = (rk[:, None] < K) & (rn[None, :] < N)
    if AWQ:
        word = tl.load(qweight_ptr + rk[:, None] * stride_qk + (rn[None, :] // 8) * stride_qn, mask=mask, other=0)
        j = rn % 8
        shift = 4 * ((j // 2) + 4 * (j % 2))  # nibble of column j in the order 0 2 4 6 1 3 5 7
        q = (word >> shift[None, :]) & 0xF
    else:
        word = tl.load(qweight_ptr + (rk[:, None] // 8) * stride_qk + rn[None, :] * stride_qn, mask=mask, other=0)
        q = (word >> ((rk % 8) * 4)[:, None]) & 0xF
        j = rn % 8
        shift = j * 4
    g = rk // GROUP
    zword = tl.load(qzeros_ptr + g[:, None] * stride_zg + (rn[None, :] // 8) * stride_zn, mask=mask, other=0)
    z = ((zword >> shift[None, :]) & 0xF) + zero_offset
    s = tl.load(scales_ptr + g[:, None] * stride_sg + rn[None, :] * stride_sn, mask=mask, other=0.0).to(tl.float32)
    return (q - z).to(tl.float32) * s


@triton.jit
def _w4a16_gemm_kernel(x_ptr, out_ptr, qweight_ptr, qzeros_ptr, scales_ptr, M, N, K,
                       stride_xm, stride_xk, stride_om, stride_on, stride_qk, stride_qn, stride_zg, stride_zn,
                       stride_sg, stride_sn, zero_offset, k_per_split,
                       GROUP: tl.constexpr, AWQ: tl.constexpr, ATOMIC: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[M, N] (+)= x[M, K-range] @ W[K-range, N]. With ATOMIC, program axis 2 is a split of
    K (the small-M path: more programs on a thin problem) and partial sums are added in
    float32 into a zeroed float32 output."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0).to(tl.float32)
        w = _w4_tile(qweight_ptr, qzeros_ptr, scales_ptr, rk, rn, K, N, stride_qk, stride_qn, stride_zg, stride_zn,
                     stride_sg, stride_sn, zero_offset, GROUP, AWQ)
        acc += tl.dot(x, w)
    optrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    omask = (rm[:, None] < M) & (rn[None, :] < N)
    if ATOMIC:
        tl.atomic_add(optrs, acc, mask=omask)
    else:
        tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


SMALL_M = 16  # up to here: split-K over thin tiles; above: one program per output tile


def w4a16_matmul(x: torch.Tensor, w: W4A16Weight) -> torch.Tensor:
    """x [..., K] @ W [K, N]: the GEMV/split-K path for M <= 16, the GEMM path above."""
    if w.perm is not None:
        x = x[..., w.perm]
    x2 = x.reshape(-1, x.shape[-1])
    M, K, N = x2.shape[0], w.in_features, w.out_features
    BK = min(64, w.group_size) if w.group_size % 16 == 0 else 16
    common = (w.qweight, w.qzeros, w.scales)
    strides = (w.qweight.stride(0), w.qweight.stride(1), w.qzeros.stride(0), w.qzeros.stride(1),
               w.scales.stride(0), w.scales.stride(1))
    if M <= SMALL_M:
        BM, BN = 16, 64
        n_k_blocks = triton.cdiv(K, BK)
        split = max(1, min(8, n_k_blocks // 4))
        k_per_split = triton.cdiv(n_k_blocks, split) * BK  # a whole number of BK tiles per split
        split = triton.cdiv(K, k_per_split)
        out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(M, BM), triton.cdiv(N, BN), split)
        _w4a16_gemm_kernel[grid](x2, out, *common, M, N, K, x2.stride(0), x2.stride(1), out.stride(0), out.stride(1),
                                 *strides, w.zero_offset, k_per_split, GROUP=w.group_size, AWQ=w.layout == "awq",
                                 ATOMIC=True, BM=BM, BN=BN, BK=BK)
        out = out.to(x.dtype)
    else:
        BM, BN = 64, 64
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(M, BM), triton.cdiv(N, BN), 1)
        _w4a16_gemm_kernel[grid](x2, out, *common, M, N, K, x2.stride(0), x2.stride(1), out.stride(0), out.stride(1),
                                 *strides, w.zero_offset, triton.cdiv(K, BK) * BK, GROUP=w.group_size,
                                 AWQ=w.layout == "awq", ATOMIC=False, BM=BM, BN=BN, BK=BK)
    return out.reshape(*x.shape[:-1], N)


# ---------------------------------------------------------------- compile-only configurations

def launch_configs(dtype: str = "fp16"):
    """(name, kernel, signature, constexprs) of every launch configuration the wrappers above
    can choose, for compile-only checks (shared memory, compile crashes) without a GPU."""
    nf4_sig = {"a_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "M": "i32", "P": "i32", "R": "i32", "stride_am": "i32",
               "stride_ar": "i32", "stride_cm": "i32", "stride_cp": "i32", "stride_er": "i32", "stride_ep": "i32",
               "packed_ptr": "*u8", "qabsmax_ptr": "*u8", "nested_ptr": "*fp32", "offset_ptr": "*fp32", "code_ptr": "*fp32",
               "nested_code_ptr": "*fp32", "BLOCKSIZE": "constexpr", "NESTED": "constexpr", "BM": "constexpr",
               "BP": "constexpr", "BR": "constexpr"}
    for bm in (16, 64):
        yield (f"nf4_matmul BM={bm}", _nf4_matmul_kernel, nf4_sig,
               {"BLOCKSIZE": 64, "NESTED": NESTED_BLOCKSIZE, "BM": bm, "BP": 64, "BR": 32})
    deq_sig = {"out_ptr": f"*{dtype}", "n": "i32", "packed_ptr": "*u8", "qabsmax_ptr": "*u8", "nested_ptr": "*fp32",
               "offset_ptr": "*fp32", "code_ptr": "*fp32", "nested_code_ptr": "*fp32", "BLOCKSIZE": "constexpr",
               "NESTED": "constexpr", "BLOCK": "constexpr"}
    yield "nf4_dequantize", _nf4_dequantize_kernel, deq_sig, {"BLOCKSIZE": 64, "NESTED": NESTED_BLOCKSIZE, "BLOCK": 1024}
    for atomic in (True, False):
        w4_sig = {"x_ptr": f"*{dtype}", "out_ptr": "*fp32" if atomic else f"*{dtype}", "qweight_ptr": "*i32",
                  "qzeros_ptr": "*i32", "scales_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32",
                  **{k: "i32" for k in ("stride_xm", "stride_xk", "stride_om", "stride_on", "stride_qk", "stride_qn",
                                        "stride_zg", "stride_zn", "stride_sg", "stride_sn", "zero_offset", "k_per_split")},
                  **{k: "constexpr" for k in ("GROUP", "AWQ", "ATOMIC", "BM", "BN", "BK")}}
        for awq in (False, True):
            for bk in (16, 32, 64):
                yield (f"w4a16 {'awq' if awq else 'gptq'} {'split-k' if atomic else 'gemm'} BK={bk}", _w4a16_gemm_kernel,
                       w4_sig, {"GROUP": 128, "AWQ": awq, "ATOMIC": atomic, "BM": 16 if atomic else 64, "BN": 64, "BK": bk})
