"""NF4 with double quantization, bit-for-bit in the bitsandbytes layout.

Written from docs/formats.md#nf4-and-double-quantization (QLoRA, Dettmers et al. 2023; bitsandbytes
`quantize_4bit` / `dequantize_4bit`). The functions here are pure: tensors in, tensors out.

Notation:
    W        weight, flattened row-major and cut into blocks of `blocksize` elements.
    absmax   per-block max|W| (float32), one per block; a trailing partial block has its own.
    code     the 16 NF4 values (sorted), `NF4_CODE`.
    offset   mean(absmax), subtracted before the absmax are themselves quantized.
    qabsmax  8-bit codes of (absmax - offset) in the signed dynamic map, blocks of 256.
"""
from __future__ import annotations

import json
import math
from typing import NamedTuple

import torch

__all__ = [
    "NF4_CODE",
    "DYNAMIC_CODE",
    "NF4Tensor",
    "quantize_nf4",
    "dequantize_nf4",
    "decode_absmax",
    "quant_state_tensors",
    "nf4_from_state_tensors",
    "serialize_nf4",
    "nf4_from_serialized",
    "ALLOWED_BLOCKSIZES",
]

ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256

# The 16 NF4 code values, float32, sorted: index == 4-bit code (docs/formats.md#nf4-code-values).
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)


def _signed_dynamic_map() -> torch.Tensor:
    """The 8-bit signed dynamic map used for the nested absmax (256 sorted float32 values).

    For exponent i in 0..6: the 2**i midpoints of linspace(0.1, 1, 2**i + 1), scaled by
    10**(i - 6), with both signs; then 0 and 1.0 (docs/formats.md#signed-dynamic-map).
    """
    values: list[float] = []
    max_exponent_bits = 7
    for i in range(max_exponent_bits):
        fractions = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        midpoints = (fractions[:-1] + fractions[1:]) / 2
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        # float32 tensor arithmetic, as bitsandbytes does it, so the map matches bit for bit
        values += (scale * midpoints).tolist()
        values += (-scale * midpoints).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = _signed_dynamic_map()


class NF4Tensor(NamedTuple):
    """A weight in NF4 with double-quantized absmax, as bitsandbytes stores it.

    Attributes:
        packed: uint8 [(n + 1) // 2, 1]; element 2i in the high nibble, 2i+1 in the low one.
        qabsmax: uint8 [n_blocks], codes of (absmax - offset) in `nested_code`.
        nested_absmax: float32 [ceil(n_blocks / 256)].
        offset: float32 scalar tensor, mean of the block absmax.
        code: float32 [16], the NF4 map.
        nested_code: float32 [256], the dynamic map.
        shape: the original weight shape.
        dtype: the original weight dtype (what dequantization returns).
        blocksize: elements per NF4 block.
    """

    packed: torch.Tensor
    qabsmax: torch.Tensor
    nested_absmax: torch.Tensor
    offset: torch.Tensor
    code: torch.Tensor
    nested_code: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int


def _blockwise_absmax_and_scaled(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax (float32) and x normalized to [-1, 1] by it.

    Full blocks are scaled by multiplying with 1/absmax, the trailing partial block by
    dividing; both mirror bitsandbytes' reference so the codes agree bit for bit.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    tail = n % blocksize
    full = n - tail
    blocks = flat[:full].reshape(-1, blocksize)  # [n_full_blocks, blocksize]
    absmax = blocks.abs().amax(dim=-1) if full else flat.new_zeros(0)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if tail:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    return absmax, scaled


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of a sorted `code`; a value on a midpoint goes to the lower code."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, right=False)


def _quantize_dynamic(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of a float32 vector in the signed dynamic map.

    Returns:
        (codes uint8 [n], absmax float32 [ceil(n / blocksize)]).
    """
    absmax, scaled = _blockwise_absmax_and_scaled(x, blocksize)
    return _nearest_code(scaled, DYNAMIC_CODE).to(torch.uint8), absmax


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64) -> NF4Tensor:
    """Quantize a weight to NF4 with double quantization (bitsandbytes `quantize_4bit`,
    quant_type="nf4", compress_statistics=True).

    Args:
        weight: float16/bfloat16/float32 tensor of any shape.
        blocksize: elements per NF4 block, one of `ALLOWED_BLOCKSIZES`.

    Returns:
        The `NF4Tensor`; `dtype` is the input dtype.
    """
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"NF4 blocksize {blocksize} is not one of {ALLOWED_BLOCKSIZES}")
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"NF4 quantizes float16/bfloat16/float32 weights, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    code = NF4_CODE.to(weight.device)
    absmax, scaled = _blockwise_absmax_and_scaled(weight, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = _nearest_code(scaled, code).to(torch.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)  # [(n+1)//2, 1]

    offset = absmax.mean()
    qabsmax, nested_absmax = _quantize_dynamic(absmax - offset)
    return NF4Tensor(
        packed=packed,
        qabsmax=qabsmax,
        nested_absmax=nested_absmax,
        offset=offset,
        code=code.clone(),
        nested_code=DYNAMIC_CODE.to(weight.device).clone(),
        shape=tuple(weight.shape),
        dtype=weight.dtype,
        blocksize=blocksize,
    )


def decode_absmax(t: NF4Tensor) -> torch.Tensor:
    """The float32 per-block absmax: nested_code[qabsmax] * nested_absmax[block // 256] + offset."""
    n = t.qabsmax.numel()
    values = t.nested_code[t.qabsmax.long()]
    block_of = torch.arange(n, device=values.device) // NESTED_BLOCKSIZE
    return (values * t.nested_absmax[block_of] + t.offset).float()


# Values dequantized per step (a multiple of the blocksize): each step's temporaries (int64
# codes, float32 values) stay a few MB and are reused from the heap; whole-matrix temporaries
# above glibc's 32 MB mmap threshold are fresh pages, faulted in and zeroed at every call (a
# Llama-3-8B gate_proj: ~1 GB of them, more CPU time in the kernel than in the arithmetic).
DEQUANT_CHUNK_VALUES = 1 << 21


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize to `dtype` (default: the original dtype), computing in float32 first, a run
    of whole blocks at a time (the same bits as dequantizing everything at once).

    Returns:
        A tensor of shape `t.shape`.
    """
    n, bs = math.prod(t.shape), t.blocksize
    absmax = decode_absmax(t)
    flat = t.packed.reshape(-1)
    step = max(1, DEQUANT_CHUNK_VALUES // bs) * bs  # even (blocksizes are even): starts on a byte
    if n <= step:  # one run: no separate output to copy into (float32 out of float32: no copy at all)
        return _dequantize_run(t, flat, absmax, 0, n).view(t.shape).to(dtype or t.dtype)
    out = torch.empty(n, dtype=dtype or t.dtype, device=flat.device)
    for e0 in range(0, n, step):
        e1 = min(n, e0 + step)
        out[e0:e1].copy_(_dequantize_run(t, flat, absmax, e0, e1))
    return out.view(t.shape)


def _dequantize_run(t: NF4Tensor, flat: torch.Tensor, absmax: torch.Tensor, e0: int, e1: int) -> torch.Tensor:
    """float32 values e0..e1 (e0 a multiple of the blocksize) of the flattened weight."""
    bs = t.blocksize
    packed = flat[e0 // 2: (e1 + 1) // 2]
    codes = torch.empty(packed.numel() * 2, dtype=torch.long, device=flat.device)
    codes[0::2] = packed >> 4  # element 2i: high nibble
    codes[1::2] = packed & 0xF
    values = t.code[codes[: e1 - e0]]
    blocks = absmax[e0 // bs: (e1 + bs - 1) // bs]
    full = (e1 - e0) // bs * bs  # only the last run can end in a partial block
    if full == e1 - e0:
        return (values.view(-1, bs) * blocks.view(-1, 1)).view(-1)
    return torch.cat([(values[:full].view(-1, bs) * blocks[:-1].view(-1, 1)).view(-1), values[full:] * blocks[-1]])


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"


def quant_state_tensors(t: NF4Tensor) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes' `Linear4bit` writes under `P.weight.<key>` (docs/formats.md#nf4-serialization).

    The JSON blob has the same keys, order and formatting as bitsandbytes'
    `QuantState.as_dict(packed=True)`, so the serialized bytes are identical.
    """
    meta = {
        "quant_type": "nf4",
        "blocksize": t.blocksize,
        "dtype": _DTYPE_NAMES[t.dtype],
        "shape": list(t.shape),
        "nested_blocksize": NESTED_BLOCKSIZE,
        "nested_dtype": "float32",
        "nested_offset": t.offset.item(),
    }
    blob = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return {
        "absmax": t.qabsmax,
        "quant_map": t.code,
        "nested_absmax": t.nested_absmax,
        "nested_quant_map": t.nested_code,
        QUANT_STATE_KEY: blob,
    }


def nf4_from_state_tensors(packed: torch.Tensor, state: dict[str, torch.Tensor]) -> NF4Tensor:
    """Rebuild an `NF4Tensor` from `P.weight` and its `P.weight.<key>` tensors (prefix removed).

    Uses the maps stored in the checkpoint rather than regenerating them.

    Raises:
        ValueError: the state is not double-quantized NF4 or a tensor is missing.
    """
    if QUANT_STATE_KEY not in state:
        found = sorted(k for k in state if k.startswith("quant_state."))
        raise ValueError(f"expected '{QUANT_STATE_KEY}' in the quant state, found {found or 'none'}")
    meta = json.loads(bytes(state[QUANT_STATE_KEY].tolist()).decode("utf-8"))
    missing = [k for k in ("absmax", "quant_map", "nested_absmax", "nested_quant_map") if k not in state]
    if missing or "nested_offset" not in meta:
        raise ValueError(f"NF4 state without double quantization is not supported (missing {missing or ['nested_offset']})")
    return NF4Tensor(
        packed=packed,
        qabsmax=state["absmax"],
        nested_absmax=state["nested_absmax"].float(),
        offset=torch.tensor(meta["nested_offset"], dtype=torch.float32),
        code=state["quant_map"].float(),
        nested_code=state["nested_quant_map"].float(),
        shape=tuple(meta["shape"]),
        dtype=_DTYPES_BY_NAME[meta["dtype"]],
        blocksize=int(meta["blocksize"]),
    )


def serialize_nf4(t: NF4Tensor, name: str = "weight") -> dict[str, torch.Tensor]:
    """`name` (the packed weight) and `name.<key>` (its quant state): a `Linear4bit`'s state dict entries."""
    return {name: t.packed, **{f"{name}.{k}": v for k, v in quant_state_tensors(t).items()}}


def nf4_from_serialized(tensors: dict[str, torch.Tensor], name: str = "weight") -> NF4Tensor:
    """The inverse of `serialize_nf4`: `name` and the `name.<key>` tensors of `tensors`."""
    state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
    return nf4_from_state_tensors(tensors[name], state)
