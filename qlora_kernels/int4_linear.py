"""`LinearInt4`: a linear layer loaded from a packed int4 checkpoint, computed as it ships.

Two layouts: GPTQ (2/3/4/8-bit, act-order via `g_idx`, v1 or v2 zeros) and AWQ GEMM (4-bit,
consecutive groups, true zeros). On CUDA the Triton W4A16 kernels of `qlora_kernels/` compute
straight from the packed words (act-order GPTQ permuted once, at the first call); elsewhere
(and for 2/3/8-bit GPTQ) the weight is unpacked and dequantized, then multiplied; at
inference that float weight is kept after the first call (see `inference_weight`).
"""
from __future__ import annotations

import contextlib
import os
import weakref
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

import qlora_kernels as kernels
from qlora_quant.packing import AWQPacked, GPTQPacked, dequantize_awq, dequantize_gptq, gptq_from_awq


_keep_dequantized = True
_kept_bytes: dict[str, int] = {}  # device type -> bytes of dequantized weights kept by live layers


def _keep_budget(device: torch.device) -> int:
    """Bytes of dequantized weights inference may keep on `device`'s kind of memory:
    QLP_DEQUANT_CACHE_GB when set, else a quarter of the host's RAM (CPU) or of the GPU's
    memory. Past it, a layer dequantizes at every call: an 8B model's linears in float32
    (28 GB) would not fit next to anything else on a 24 GB host."""
    env = os.environ.get("QLP_DEQUANT_CACHE_GB")
    if env is not None:
        return int(float(env) * 2**30)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def _release(kind: str, nbytes: int) -> None:
    _kept_bytes[kind] = _kept_bytes.get(kind, 0) - nbytes


@contextlib.contextmanager
def dequantized_cache(enabled: bool) -> Iterator[None]:
    """Within the block, inference on the torch path keeps (True, the default) or does not keep
    (False) each layer's dequantized weight. Off for forwards that are not decoding, such as
    the eval loss between training steps: kept, the weights of every layer would stay
    dequantized (in float32 on the CPU: 4x the bf16 model, ~28 GB for an 8B)."""
    global _keep_dequantized
    before, _keep_dequantized = _keep_dequantized, enabled
    try:
        yield
    finally:
        _keep_dequantized = before


def inference_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight for the torch path. Without a kernel (on the CPU), inference
    unpacks each layer once and keeps the float weight, so decoding does not re-unpack every
    layer per token; the values are exactly the packed checkpoint's. Under autograd, inside
    `dequantized_cache(False)`, and for layers past the budget of `_keep_budget` nothing new is
    kept (a weight training keeps, `training_weights`, is used): memory stays at the packed size."""
    return kept_weight(layer, dtype, keep=not torch.is_grad_enabled() and _keep_dequantized)


def kept_weight(layer: nn.Module, dtype: torch.dtype, keep: bool = True) -> torch.Tensor:
    """`layer.dequantized_weight(dtype)`, from the layer's kept copy when it has one; `keep`:
    keep the copy made here, while the kept bytes stay within `_keep_budget`."""
    key = (dtype, layer.weight_key())
    cached = getattr(layer, "_dequantized", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    weight = layer.dequantized_weight(dtype)
    if not keep:
        return weight
    if cached is not None:  # a stale entry (another dtype or device): give its bytes back
        cached[2]()  # runs _release once
        del layer._dequantized
    kind, nbytes = weight.device.type, weight.numel() * weight.element_size()
    if _kept_bytes.get(kind, 0) + nbytes <= _keep_budget(weight.device):
        _kept_bytes[kind] = _kept_bytes.get(kind, 0) + nbytes
        layer._dequantized = (key, weight, weakref.finalize(layer, _release, kind, nbytes))
    return weight


_keep_for_training = False


def fits_kept(layers: list[nn.Module], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the dequantized weights of all `layers` fit `_keep_budget` together, beside what
    is kept already."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = sum(m.out_features * m.in_features * itemsize for m in layers)
    return _kept_bytes.get(device.type, 0) + total <= _keep_budget(device)


@contextlib.contextmanager
def training_weights(layers: list[nn.Module]) -> Iterator[None]:
    """Within the block, an NF4 layer on the torch path (no kernel: the CPU) keeps its
    dequantized weight between training steps instead of dequantizing it twice per step
    (forward and input gradient): the same values (`LinearNF4.dequantized_weight`), so the same
    training (scripts/bench_train_step.py: 1.29x per SmolLM2 step). On if `layers` (the model's
    NF4 layers; the train stage passes them only when they fit the budget together); their
    kept weights are dropped when the block ends, so the stage's process does not carry them on."""
    global _keep_for_training
    before, _keep_for_training = _keep_for_training, bool(layers)
    try:
        yield
    finally:
        _keep_for_training = before
        forget_kept(layers)


def forget_kept(layers: list[nn.Module]) -> None:
    """Drop the kept dequantized weights of `layers`, their bytes back in the budget."""
    for layer in layers:
        cached = getattr(layer, "_dequantized", None)
        if cached is not None:
            cached[2]()  # runs _release once
            del layer._dequantized


def keep_for_training() -> bool:
    return _keep_for_training


class LinearInt4(nn.Module):
    """y = x @ W^T + b with W stored packed.

    Build with `from_gptq` or `from_awq`; the buffers carry the checkpoint's tensor names
    (`qweight`, `qzeros`, `scales`, and `g_idx` for GPTQ); an AWQ checkpoint's are converted
    to the GPTQ layout at load (`from_awq`), its origin kept in `source_format`.
    """

    source_format: Optional[str] = None  # "awq-gemm": repacked from an AWQ GEMM checkpoint

    def __init__(self, layout: str, bits: int, in_features: int, out_features: int, tensors: dict[str, torch.Tensor],
                 v1: bool = False, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if layout not in ("gptq", "awq"):
            raise ValueError(f"unknown int4 layout {layout!r}")
        self.layout, self.bits, self.v1 = layout, bits, v1
        self.in_features, self.out_features = in_features, out_features
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_gptq(cls, packed: GPTQPacked, bits: int, v1: bool, bias: Optional[torch.Tensor] = None) -> "LinearInt4":
        """`v1`: the checkpoint stores zero - 1 (format "gptq") rather than the true zero ("gptq_v2")."""
        return cls("gptq", bits, packed.g_idx.numel(), packed.scales.shape[1], packed._asdict(), v1, bias)

    @classmethod
    def from_awq(cls, packed: AWQPacked, bias: Optional[torch.Tensor] = None, repack: bool = True) -> "LinearInt4":
        """`repack`: hold the weights in the GPTQ layout (true zeros), converted once here, since
        the W4A16 kernels read AWQ's N-packed, nibble-interleaved words 27-53% slower than the
        GPTQ layout (H200, benchmarks/kernel_tuning_nvidia-h200.json; README "Kernels"); the
        values are unchanged."""
        if repack:
            module = cls.from_gptq(gptq_from_awq(packed), 4, v1=False, bias=bias)
            module.source_format = "awq-gemm"
            return module
        return cls("awq", 4, packed.qweight.shape[0], packed.scales.shape[1], packed._asdict(), False, bias)

    def weight_key(self) -> tuple:
        return (self.qweight.device, self.qweight.data_ptr())

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.layout == "awq":
            return dequantize_awq(AWQPacked(self.qweight, self.qzeros, self.scales)).to(dtype)
        packed = GPTQPacked(self.qweight, self.qzeros, self.scales, self.g_idx)
        return dequantize_gptq(packed, self.bits, self.v1, dtype)

    def kernel_weight(self) -> Optional["qlora_kernels.W4A16Weight"]:
        """The packed weight as the W4A16 kernels read it (None: not a layout they take),
        prepared once per device."""
        key = (self.qweight.device, self.qweight.data_ptr())
        if getattr(self, "_kernel_key", None) != key:
            if self.layout == "awq":
                self._kernel_weight = kernels.from_awq(AWQPacked(self.qweight, self.qzeros, self.scales))
            else:
                self._kernel_weight = kernels.from_gptq(GPTQPacked(self.qweight, self.qzeros, self.scales, self.g_idx),
                                                        self.bits, self.v1)
            self._kernel_key = key
        return self._kernel_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if kernels.use_triton(x) and self.kernel_weight() is not None:
            y = kernels.w4a16_matmul(x, self.kernel_weight())
            return y + bias if bias is not None else y
        return F.linear(x, inference_weight(self, x.dtype), bias)

    def extra_repr(self) -> str:
        fmt = "awq-gemm" if self.layout == "awq" else f"gptq{'' if self.v1 else '_v2'}"
        if self.source_format:
            fmt += f" (from {self.source_format})"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {fmt}"
