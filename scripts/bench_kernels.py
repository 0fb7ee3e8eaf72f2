"""Kernel benchmark on a CUDA device: NF4 dequantize, NF4 linear (forward + input gradient),
W4A16 (GPTQ and AWQ layouts, g128, with and without act-order) against a bf16 torch.matmul of
the same shape and, where installed, bitsandbytes.

Shapes are the linears of Llama-3-8B and Llama-3-70B at M = 1, 16, 64, 256, 2048 tokens.
Every time is the median of `triton.testing.do_bench` (L2 flushed between runs; M <= 16 also
under CUDA graphs, where launch overhead matters). Bandwidth is the bytes a kernel must move
(packed weight + scales + activations + output) over its time, as a fraction of a
device-to-device copy measured in the same run. Writes benchmarks/kernels_<device>.json.

    python scripts/bench_kernels.py [--quick] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {  # (name, K, N) of the decoder linears
    "llama3-8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)],
    "llama3-70b": [("qkv", 8192, 10240), ("o", 8192, 8192), ("gate_up", 8192, 57344), ("down", 28672, 8192)],
}
MS = (1, 16, 64, 256, 2048)


def bench(fn, graph: bool = False) -> float:
    """Median milliseconds; L2 flushed by do_bench between runs."""
    import triton.testing

    if graph:
        return triton.testing.do_bench_cudagraph(fn, return_mode="median")
    return triton.testing.do_bench(fn, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (the practical peak)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * a.numel() / (ms / 1e3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8B shapes and M = 1, 16 only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA device (none is visible); the kernels are tested on the CPU "
              "by `make test` through the Triton interpreter", file=sys.stderr)
        return 2
    import kernels
    from kernels import triton_kernels as tk
    from quant.gptq import rtn_quantize
    from quant.nf4 import quantize_nf4
    from quant.packing import AWQPacked, GPTQPacked, pack_awq, pack_gptq

    device = torch.cuda.get_device_name()
    peak = copy_bandwidth()
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
    except Exception:
        bnb = None
    rows = []
    shapes = {"llama3-8b": SHAPES["llama3-8b"]} if args.quick else SHAPES
    ms_list = (1, 16) if args.quick else MS
    for model, layers in shapes.items():
        for lname, K, N in layers:
            W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
            res = rtn_quantize(W.float(), 4, 128, sym=False, scale_dtype=torch.float16)
            gptq = kernels.from_gptq(GPTQPacked(*pack_gptq(res.codes, res.zeros, res.scales, res.g_idx, 4, v1=False)), 4, False)
            perm_gidx = res.g_idx[torch.randperm(K, device="cuda")]  # an act-order g_idx: same groups, shuffled rows
            gptq_ao = kernels.from_gptq(GPTQPacked(*pack_gptq(res.codes, res.zeros, res.scales, perm_gidx, 4, v1=False)), 4, False)
            awq = kernels.from_awq(AWQPacked(*pack_awq(res.codes, res.zeros, res.scales)))
            nf4 = quantize_nf4(W, 64)
            packed_bytes = K * N // 2 + (K // 128) * N * 2 * 2
            del res
            # NF4 dequantize (no M)
            t = bench(lambda: tk.nf4_dequantize(nf4, torch.bfloat16))
            moved = K * N // 2 + K * N * 2 + K * N // 64
            row = {"model": model, "layer": lname, "K": K, "N": N, "M": 0, "kernel": "nf4_dequantize", "ms": t,
                   "bandwidth_fraction": moved / (t / 1e3) / peak}
            if bnb is not None:
                q, state = bnbF.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
                tb = bench(lambda: bnbF.dequantize_4bit(q, state))
                row.update(baseline="bitsandbytes", baseline_ms=tb, speedup=tb / t)
            rows.append(row)
            for M in ms_list:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                graph = M <= 16
                t_bf16 = bench(lambda: x @ W.t(), graph)
                for name, fn in (("w4a16 gptq", lambda: kernels.w4a16_matmul(x, gptq)),
                                 ("w4a16 gptq act-order", lambda: kernels.w4a16_matmul(x, gptq_ao)),
                                 ("w4a16 awq", lambda: kernels.w4a16_matmul(x, awq)),
                                 ("nf4 linear fwd", lambda: kernels.nf4_matmul(x, nf4))):
                    t = bench(fn, graph)
                    moved = packed_bytes + 2 * M * (K + N)
                    rows.append({"model": model, "layer": lname, "K": K, "N": N, "M": M, "kernel": name, "ms": t,
                                 "bandwidth_fraction": moved / (t / 1e3) / peak, "baseline": "bf16 torch.matmul",
                                 "baseline_ms": t_bf16, "speedup": t_bf16 / t})
                g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
                t = bench(lambda: kernels.nf4_matmul_grad_input(g, nf4), graph)
                t_ref = bench(lambda: g @ W, graph)
                rows.append({"model": model, "layer": lname, "K": K, "N": N, "M": M, "kernel": "nf4 linear grad_input",
                             "ms": t, "bandwidth_fraction": (packed_bytes + 2 * M * (K + N)) / (t / 1e3) / peak,
                             "baseline": "bf16 torch.matmul", "baseline_ms": t_ref, "speedup": t_ref / t})
            del W, nf4, gptq, gptq_ao, awq
            torch.cuda.empty_cache()

    print(f"device: {device}; device-to-device copy: {peak / 1e9:.0f} GB/s")
    print(f"{'model':<11} {'layer':<8} {'M':>5} {'kernel':<24} {'ms':>9} {'BW frac':>8} {'speedup':>8}  baseline")
    for r in rows:
        print(f"{r['model']:<11} {r['layer']:<8} {r['M']:>5} {r['kernel']:<24} {r['ms']:>9.4f} "
              f"{r['bandwidth_fraction']:>8.2f} {r.get('speedup', float('nan')):>8.2f}  {r.get('baseline', '')}")
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent.parent / "benchmarks" / f"kernels_{slug}.json"
    out.write_text(json.dumps({"device": device, "copy_bytes_per_second": peak, "when": time.strftime("%Y-%m-%d"),
                               "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
