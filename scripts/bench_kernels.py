"""Kernel benchmark against the speed targets of docs/kernels.md#speed-targets (a CUDA device).

What runs, per Llama-3-8B and Llama-3-70B decoder linear (qkv, o, gate_up, down; K x N) and
per M in {1, 4, 16, 128, 1024, 4096} tokens:

  - NF4 dequantize -> bf16 (no M), as a fraction of the measured copy bandwidth, and against
    bitsandbytes `dequantize_4bit` when bitsandbytes is installed;
  - W4A16 (GPTQ and AWQ layouts, group 128; GPTQ also with act-order) against a bf16
    `F.linear` of the same shape, against dequantize + cuBLAS, and act-order against plain;
  - the QLoRA NF4 linear, forward + input gradient, against dequantize + cuBLAS (twice, as the
    bitsandbytes/unsloth QLoRA path does) and against a bf16 linear; bitsandbytes
    `matmul_4bit` (forward) when installed;
  - at M <= 16 the wrappers take the GEMV kernels (W4A16 and the NF4 forward; the `path`
    column says which kernel ran): each is also timed against the split-K kernel it replaced
    ("split-K (GEMV off)", for information: where the GEMV stops paying).

Protocol:
  - Weights rotate: each timed function gets as many copies of its weights (packed tensors,
    scales, bf16 baselines alike) as make more than 2x the L2 cache, and successive calls
    cycle through them, so every call reads its weights from HBM (the L2 is flushed at every
    M, for the kernels and the baselines alike). Activations are not rotated (they are hot in
    a real forward pass too).
  - Each function is timed twice: eager (CUDA events around a loop over the copies) and
    under CUDA graphs (one graph of one call per copy, replayed), where Triton's launch
    overhead (tens of us) does not hide a microsecond kernel. The median over --reps
    repetitions, per call. Targets are judged on the CUDA-graph times of both sides.
  - Before timing, every kernel's output is checked against its plain-torch twin
    (qlora_kernels/reference.py) on the same packed weights: relative Frobenius error at most 1e-2
    in bf16; a failed check fails the row whatever its speed.
  - Bandwidth: the bytes a kernel must move (packed weight, scales and zeros, activations in
    and out, bytes as docs/kernels.md#physical-limits counts them) over its time, divided by
    a device-to-device copy of 1 GiB measured in the same run.
  - Targets (docs/kernels.md#speed-targets), one per row: NF4 dequantize >= 0.85 of copy
    bandwidth on 4096x14336 and larger; W4A16 at M = 1 >= 0.80 of copy bandwidth and >= 3.0x
    bf16 on 4096x14336 and larger, >= 1.7x below; M = 4 and 16 >= 2.6x (the M = 16 target;
    M = 4 has none of its own); M >= 128 >= 0.95x; act-order at M = 1 at most 5% slower than
    plain (>= 0.952x); NF4 forward + backward >= 1.0x dequantize + cuBLAS at every M and
    >= 0.9x bf16 from M = 4096. Rows without a target are for information (e.g. the
    W4A16 crossover to dequantize + cuBLAS, `qlora_kernels/triton_kernels.py` *_CUBLAS_MIN_M).
    A row passes when the measured value is at least its target: no tolerance for noise.
  - Weights are random packed words and scales (speed does not depend on the values;
    correctness is checked separately against the twins).

Writes benchmarks/kernels_<device>.json (every row, times, device, versions, protocol) and
prints a table with target and pass/fail per row. `--dry-run` prints the rows it would
measure with their targets, on any machine, without a GPU.

    python scripts/bench_kernels.py [--dry-run] [--quick] [--models 8b,70b] [--ms 1,16] [--reps N] [--out PATH]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parent.parent

SHAPES = {  # (layer, K, N) of the decoder linears: y [M, N] = x [M, K] @ W
    "llama3-8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)],
    "llama3-70b": [("qkv", 8192, 10240), ("o", 8192, 8192), ("gate_up", 8192, 57344), ("down", 28672, 8192)],
}
MS = (1, 4, 16, 128, 1024, 4096)
GROUP = 128
NF4_BLOCK = 64
LARGE = 4096 * 14336  # "4096x14336 and larger" in the targets
# qlora_kernels/triton_kernels.py GEMV_MAX_M (not imported here: --dry-run runs without the kernels);
# up to this M the W4A16 and NF4 forward wrappers take the GEMV, and the rows below also time
# the split-K kernel they replaced ("split-K (GEMV off)", no target), for the crossover
GEMV_MAX_M = 16
GEMV_OFF = "split-K (GEMV off)"
CHECK_TOLERANCE = 1e-2
DEVICE = "cuda"
DTYPE = torch.bfloat16  # activations and the bf16 baselines (tests/kernels swaps in cpu + fp16: the interpreter)


# ---------------------------------------------------------------- the plan: rows and targets

def _target(kernel: str, baseline: str, M: Optional[int], K: int, N: int) -> tuple[Optional[float], str]:
    """(target value, its source) of docs/kernels.md#speed-targets for one comparison."""
    large = K * N >= LARGE
    if kernel == "nf4_dequantize" and baseline == "copy bandwidth":
        return (0.85, "NF4 dequantize: >= 85% of copy bandwidth (4096x14336 and larger)") if large else (None, "")
    if kernel in ("w4a16 gptq", "w4a16 awq"):
        if baseline == "copy bandwidth":
            return (0.80, "W4A16 M=1: >= 80% of copy bandwidth (4096x14336 and larger)") if large else (None, "")
        if baseline == "bf16 F.linear":
            if M == 1:
                return (3.0, "W4A16 M=1: >= 3.0x bf16 (4096x14336 and larger)") if large else \
                    (1.7, "W4A16 M=1: >= 1.7x bf16 (4096x4096)")
            if M <= 16:
                return 2.6, "W4A16: >= 2.6x bf16 at M=16 (M=4 held to it)"
            if M >= 128:
                return 0.95, "W4A16: never below 0.95x bf16 from M=128"
    if kernel == "w4a16 gptq act-order" and baseline == "w4a16 gptq" and M == 1:
        return 1 / 1.05, "act-order at M=1: at most 5% slower than plain"
    if kernel == "nf4 linear fwd+bwd":
        if baseline == "dequantize + cuBLAS":
            return 1.0, "QLoRA NF4: never slower than dequantize-then-cuBLAS"
        if baseline == "bf16 linear fwd+bwd" and M is not None and M >= 4096:
            return 0.9, "QLoRA NF4: >= 0.9x bf16 linear from 4096 tokens"
    return None, ""


def plan(models: list[str], ms: tuple[int, ...], bnb: bool) -> list[dict]:
    """Every row: one kernel against one baseline (or the copy bandwidth) at one shape and M."""
    rows = []

    def add(model, layer, K, N, M, kernel, baseline):
        target, source = _target(kernel, baseline, M, K, N)
        rows.append({"model": model, "layer": layer, "K": K, "N": N, "M": M, "kernel": kernel, "baseline": baseline,
                     "metric": "fraction of copy bandwidth" if baseline == "copy bandwidth" else "speedup",
                     "target": target, "target_source": source})

    for model in models:
        for layer, K, N in SHAPES[model]:
            add(model, layer, K, N, None, "nf4_dequantize", "copy bandwidth")
            if bnb:
                add(model, layer, K, N, None, "nf4_dequantize", "bitsandbytes dequantize_4bit")
            for M in ms:
                for kernel in ("w4a16 gptq", "w4a16 awq", "w4a16 gptq act-order"):
                    if M == 1:
                        add(model, layer, K, N, M, kernel, "copy bandwidth")
                    add(model, layer, K, N, M, kernel, "bf16 F.linear")
                    add(model, layer, K, N, M, kernel, "dequantize + cuBLAS")
                    if M <= GEMV_MAX_M:
                        add(model, layer, K, N, M, kernel, GEMV_OFF)
                add(model, layer, K, N, M, "w4a16 gptq act-order", "w4a16 gptq")
                add(model, layer, K, N, M, "nf4 linear fwd+bwd", "dequantize + cuBLAS")
                add(model, layer, K, N, M, "nf4 linear fwd+bwd", "bf16 linear fwd+bwd")
                if M <= GEMV_MAX_M:
                    add(model, layer, K, N, M, "nf4 linear fwd", GEMV_OFF)
                if bnb:
                    add(model, layer, K, N, M, "nf4 linear fwd", "bitsandbytes matmul_4bit")
    return rows


# ---------------------------------------------------------------- timing

def _copies(bytes_per_copy: int, l2_bytes: int) -> int:
    """Copies of a weight whose round trip exceeds 2x the L2 cache (at least 2)."""
    return max(2, math.ceil(2 * l2_bytes / max(bytes_per_copy, 1)) + 1)


def time_calls(calls: list[Callable[[], object]], reps: int) -> dict:
    """Median microseconds per call over `reps` passes through `calls` (one per weight copy),
    eager and replayed from a CUDA graph."""
    for c in calls:  # compile, allocate workspaces
        c()
    torch.cuda.synchronize()

    def events(run, per_pass):
        out = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1e3 / per_pass)
        return statistics.median(out)

    eager = events(lambda: [c() for c in calls], len(calls))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:  # the split-K workspace is per stream: allocate it outside the capture
            c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for c in calls:
            c()
    graphed = events(graph.replay, len(calls))
    del graph
    return {"us": graphed, "us_eager": eager}


def copy_bandwidth(reps: int) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write; the practical peak)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = time_calls([lambda: b.copy_(a)], reps)["us"]
    return 2 * a.numel() / (t / 1e6)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- weights

def _random_w4a16(K: int, N: int, layout: str, act_order: bool):
    """A W4A16Weight of random packed words, zeros and fp16 scales (group 128). Act-order:
    the group-sorted weight plus a random column permutation, what `from_gptq` makes of an
    act-order checkpoint."""
    from qlora_kernels.layouts import W4A16Weight

    g = K // GROUP
    dev = DEVICE
    rand32 = lambda *s: torch.randint(-2**31, 2**31 - 1, s, dtype=torch.int32, device=dev)  # noqa: E731
    qweight = rand32(K // 8, N) if layout == "gptq" else rand32(K, N // 8)
    scales = (torch.rand(g, N, device=dev) * 0.01 + 0.001).half()
    perm = torch.randperm(K, device=dev) if act_order else None
    return W4A16Weight(layout, qweight, rand32(g, N // 8), scales, GROUP, 0, perm, K, N)


def _random_nf4(K: int, N: int):
    """An NF4Tensor [N, K] (block 64, double quantization) of random codes."""
    from qlora_quant.nf4 import DYNAMIC_CODE, NESTED_BLOCKSIZE, NF4_CODE, NF4Tensor

    n = N * K
    blocks = n // NF4_BLOCK
    dev = DEVICE
    return NF4Tensor(
        packed=torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8, device=dev),
        qabsmax=torch.randint(0, 256, (blocks,), dtype=torch.uint8, device=dev),
        nested_absmax=torch.rand(math.ceil(blocks / NESTED_BLOCKSIZE), device=dev) * 0.01,
        offset=torch.tensor(0.02, device=dev), code=NF4_CODE.to(dev), nested_code=DYNAMIC_CODE.to(dev),
        shape=(N, K), dtype=DTYPE, blocksize=NF4_BLOCK)


def _w4_bytes(K: int, N: int) -> int:
    return K * N // 2 + (K // GROUP) * N * 2 + (K // GROUP) * N // 2


def _nf4_bytes(K: int, N: int) -> int:
    return K * N // 2 + K * N // NF4_BLOCK


# ---------------------------------------------------------------- measuring

def measure(rows: list[dict], reps: int) -> dict:
    import torch.nn.functional as F

    from qlora_kernels import reference
    from qlora_kernels import triton_kernels as tk

    bnb, bnbF = _bitsandbytes()
    l2 = _l2_bytes()
    copy_bw = copy_bandwidth(reps)
    times: dict = {}  # (model, layer, M, name) -> {"us", "us_eager", "check"}
    shapes = sorted({(r["model"], r["layer"], r["K"], r["N"]) for r in rows}, key=lambda s: (s[0], s[2] * s[3]))
    ms = sorted({r["M"] for r in rows if r["M"] is not None})
    for model, layer, K, N in shapes:
        print(f"measuring {model} {layer} {K}x{N} ...", flush=True)
        n_w4 = _copies(_w4_bytes(K, N), l2)
        n_nf4 = _copies(_nf4_bytes(K, N), l2)
        n_bf16 = _copies(2 * K * N, l2)
        w4 = {name: [_random_w4a16(K, N, layout, ao) for _ in range(n_w4)]
              for name, layout, ao in (("w4a16 gptq", "gptq", False), ("w4a16 awq", "awq", False),
                                       ("w4a16 gptq act-order", "gptq", True))}
        nf4 = [_random_nf4(K, N) for _ in range(n_nf4)]
        bf16 = [torch.randn(N, K, device=DEVICE, dtype=DTYPE) * 0.02 for _ in range(n_bf16)]
        bnb_q = None
        if bnb is not None:
            w = reference.nf4_dequantize(nf4[0], DTYPE)
            bnb_q = [bnbF.quantize_4bit(w, blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4")
                     for _ in range(n_nf4)]
            del w

        def record(M, name, calls, check=None):
            t = time_calls(calls, reps)
            t["check_rel_error"] = check
            times[(model, layer, M, name)] = t

        # NF4 dequantize
        want = reference.nf4_dequantize(nf4[0], DTYPE)
        err = rel_error(tk.nf4_dequantize(nf4[0], DTYPE), want)
        del want
        record(None, "nf4_dequantize", [lambda t=t: tk.nf4_dequantize(t, DTYPE) for t in nf4], err)
        if bnb_q is not None:
            record(None, "bitsandbytes dequantize_4bit", [lambda q=q: bnbF.dequantize_4bit(*q) for q in bnb_q])
        for M in ms:
            x = torch.randn(M, K, device=DEVICE, dtype=DTYPE)
            g = torch.randn(M, N, device=DEVICE, dtype=DTYPE)
            record(M, "bf16 F.linear", [lambda w=w: F.linear(x, w) for w in bf16])
            record(M, "bf16 linear fwd+bwd", [lambda w=w: (F.linear(x, w), g @ w) for w in bf16])
            for name, ws in w4.items():
                err = rel_error(tk.w4a16_matmul(x, ws[0]), reference.w4a16_matmul(x, ws[0]))
                record(M, name, [lambda w=w: tk.w4a16_matmul(x, w) for w in ws], err)
                if M <= tk.GEMV_MAX_M:
                    with _gemv_off(tk):
                        err = rel_error(tk.w4a16_matmul(x, ws[0]), reference.w4a16_matmul(x, ws[0]))
                        record(M, f"{name} {GEMV_OFF}", [lambda w=w: tk.w4a16_matmul(x, w) for w in ws], err)
                record(M, f"{name} dequantize + cuBLAS",
                       [lambda w=w: torch.matmul(x, tk.w4a16_dequantize(w, x.dtype)) for w in ws])
            err = max(rel_error(tk.nf4_matmul(x, nf4[0]), reference.nf4_matmul(x, nf4[0])),
                      rel_error(tk.nf4_matmul_grad_input(g, nf4[0]), reference.nf4_matmul_grad_input(g, nf4[0])))
            record(M, "nf4 linear fwd+bwd", [lambda t=t: (tk.nf4_matmul(x, t), tk.nf4_matmul_grad_input(g, t))
                                             for t in nf4], err)
            err = rel_error(tk.nf4_matmul(x, nf4[0]), reference.nf4_matmul(x, nf4[0]))
            record(M, "nf4 linear fwd", [lambda t=t: tk.nf4_matmul(x, t) for t in nf4], err)
            if M <= tk.GEMV_MAX_M:
                with _gemv_off(tk):
                    err = rel_error(tk.nf4_matmul(x, nf4[0]), reference.nf4_matmul(x, nf4[0]))
                    record(M, f"nf4 linear fwd {GEMV_OFF}", [lambda t=t: tk.nf4_matmul(x, t) for t in nf4], err)
            record(M, "nf4 dequantize + cuBLAS",
                   [lambda t=t: (x @ tk.nf4_dequantize(t, x.dtype).t(), g @ tk.nf4_dequantize(t, g.dtype))
                    for t in nf4])
            if bnb_q is not None:
                record(M, "bitsandbytes matmul_4bit", [lambda q=q: bnb.matmul_4bit(x, q[0].t(), quant_state=q[1])
                                                       for q in bnb_q])
        del w4, nf4, bf16, bnb_q
        torch.cuda.empty_cache()
    return {"copy_bytes_per_second": copy_bw, "l2_bytes": l2, "times": times}


class _gemv_off:
    """Within the block the wrappers skip the GEMV (GEMV_MAX_M = 0): the split-K kernel runs."""

    def __init__(self, tk):
        self.tk = tk

    def __enter__(self):
        self.saved = self.tk.GEMV_MAX_M
        self.tk.GEMV_MAX_M = 0

    def __exit__(self, *exc):
        self.tk.GEMV_MAX_M = self.saved


def _bitsandbytes():
    """(bitsandbytes, bitsandbytes.functional), or (None, None) when not installed."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
    except Exception:
        return None, None
    return bnb, bnbF


def _l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)


def _path(kernel: str, M: Optional[int]) -> str:
    """Which path the wrapper takes at this M."""
    from qlora_kernels import triton_kernels as tk

    if M is None or not kernel.startswith(("w4a16", "nf4 linear")):
        return "-"
    limit = tk.NF4_CUBLAS_MIN_M if kernel.startswith("nf4") else tk.W4A16_CUBLAS_MIN_M
    if M >= limit:
        return "dequantize + cuBLAS"
    if M <= tk.GEMV_MAX_M:
        # the NF4 GEMV is the forward only; the input gradient of "fwd+bwd" stays split-K
        return "GEMV + split-K grad" if kernel == "nf4 linear fwd+bwd" else "GEMV"
    return "split-K" if M <= tk.SPLIT_K_MAX_M else "tiled GEMM"


def evaluate(rows: list[dict], measured: dict) -> None:
    """Fill each row's times, value and pass/fail from the measurements."""
    times, bw = measured["times"], measured["copy_bytes_per_second"]
    for r in rows:
        key = (r["model"], r["layer"], r["M"])
        k = times[key + (r["kernel"],)]
        r.update(us=k["us"], us_eager=k["us_eager"], check_rel_error=k["check_rel_error"],
                 path=_path(r["kernel"], r["M"]))
        K, N, M = r["K"], r["N"], r["M"]
        if r["baseline"] == "copy bandwidth":
            if r["kernel"] == "nf4_dequantize":
                moved = _nf4_bytes(K, N) + 2 * K * N
            else:
                moved = _w4_bytes(K, N) + 2 * M * (K + N)
            r["value"] = moved / (k["us"] / 1e6) / bw
        else:
            base = r["baseline"]
            if base == "dequantize + cuBLAS":  # measured per weight format
                base = f"{'nf4' if r['kernel'].startswith('nf4') else r['kernel']} dequantize + cuBLAS"
            elif base == GEMV_OFF:  # the same kernel name, measured with the GEMV off
                base = f"{r['kernel']} {GEMV_OFF}"
            b = times[key + (base,)]
            r.update(baseline_us=b["us"], baseline_us_eager=b["us_eager"], value=b["us"] / k["us"])
        ok_check = r["check_rel_error"] is None or r["check_rel_error"] <= CHECK_TOLERANCE
        r["pass"] = None if r["target"] is None else bool(ok_check and r["value"] >= r["target"])
        if not ok_check:
            r["pass"] = False


def print_table(rows: list[dict], measured: bool) -> None:
    head = f"{'model':<10} {'layer':<7} {'K':>5} {'N':>5} {'M':>4} {'kernel':<20} {'baseline':<28} {'target':>7}"
    if measured:
        head += f" {'us':>9} {'base us':>9} {'value':>7} {'check':>8} {'pass':>4}  path"
    head += "  target source"
    print(head)
    for r in rows:
        target = "-" if r["target"] is None else f"{r['target']:.2f}{'x' if r['metric'] == 'speedup' else ''}"
        line = (f"{r['model']:<10} {r['layer']:<7} {r['K']:>5} {r['N']:>5} {'-' if r['M'] is None else r['M']:>4} "
                f"{r['kernel']:<20} {r['baseline']:<28} {target:>7}")
        if measured:
            err = r["check_rel_error"]
            verdict = "-" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
            line += (f" {r['us']:>9.2f} {r.get('baseline_us', float('nan')):>9.2f} {r['value']:>7.3f} "
                     f"{'-' if err is None else f'{err:.1e}':>8} {verdict:>4}  {r['path']}")
        print(f"{line}  {r['target_source']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the rows and their targets; measure nothing")
    parser.add_argument("--quick", action="store_true", help="Llama-3-8B shapes at M = 1 and 16 only")
    parser.add_argument("--models", default="8b,70b", help="comma-separated: 8b, 70b (default both)")
    parser.add_argument("--ms", default=None, help=f"comma-separated M values (default {','.join(map(str, MS))})")
    parser.add_argument("--reps", type=int, default=20, help="repetitions per timing; the median is kept (default 20)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/kernels_<device>.json)")
    args = parser.parse_args(argv)
    models = ["llama3-8b"] if args.quick else [f"llama3-{m.strip()}" for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: 8b, 70b")
    ms = (1, 16) if args.quick else tuple(int(m) for m in args.ms.split(",")) if args.ms else MS
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None  # measure() imports it
    rows = plan(models, ms, have_bnb)
    if args.dry_run:
        print(f"dry run: {len(rows)} rows would be measured (bitsandbytes {'found' if have_bnb else 'not installed'}); "
              "targets from docs/kernels.md#speed-targets")
        print_table(rows, measured=False)
        return 0
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA device (none is visible); `--dry-run` lists what it measures. "
              "The kernels are tested on the CPU by tests/kernels through the Triton interpreter", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    measured = measure(rows, args.reps)
    evaluate(rows, measured)
    print(f"device: {device}; device-to-device copy: {measured['copy_bytes_per_second'] / 1e9:.0f} GB/s; "
          f"L2 {measured['l2_bytes'] >> 20} MiB; times under CUDA graphs, L2 flushed by rotating weight copies")
    print_table(rows, measured=True)
    judged = [r for r in rows if r["pass"] is not None]
    print(f"{sum(r['pass'] for r in judged)} of {len(judged)} targets met; "
          f"{sum(1 for r in rows if (r['check_rel_error'] or 0) > CHECK_TOLERANCE)} output checks failed")
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = Path(args.out) if args.out else REPO / "benchmarks" / f"kernels_{slug}.json"
    import triton

    out.write_text(json.dumps({
        "device": device, "when": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
        "triton": triton.__version__, "copy_bytes_per_second": measured["copy_bytes_per_second"],
        "l2_bytes": measured["l2_bytes"], "reps": args.reps,
        "protocol": "median per call under CUDA graphs (eager in us_eager); weights rotated over copies > 2x L2; "
                    "outputs checked against qlora_kernels/reference.py (relative Frobenius error <= 1e-2)",
        "rows": rows}, indent=1))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
