"""How long does an int4 linear take to dequantize on the CPU? Where no Triton kernel runs, a
`LinearInt4` dequantizes its weight before the matmul: once per evaluation for a small model,
at every call for the layers past the kept budget of a large one (an 8B model on a 24 GB host:
about three quarters of them), so this is most of a CPU evaluation of an 8B int4 checkpoint.

Times, in one process, `qlora_quant.packing.dequantize_gptq` / `dequantize_awq` against the
plain formula `scales[g_idx].t() * (codes - zeros[g_idx].t())` on the same unpacked codes (the
implementation before the contiguous one; its unpacking time is the baseline's too, measured
with the pre-change general bit-stream unpacker kept here), on Llama-3-8B's linear shapes,
group 128: GPTQ without and with act-order, AWQ GEMM, and the load-time AWQ -> GPTQ repacking.
Every output is checked equal to the baseline's bit for bit. Medians of --repeats, the two
implementations taking turns. Prints a table and writes benchmarks/dequantize_cpu.json.

    python scripts/bench_dequantize.py [--repeats 3] [--shapes q,gate] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from qlora_quant import packing

REPO = Path(__file__).resolve().parent.parent
SHAPES = {  # name: (out_features, in_features) of Llama-3-8B's decoder linears
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}
GROUP = 128


def general_unpack_along_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The unpacker before the 2/4/8-bit fast path: every width as a 64-bit window over word
    pairs (what 3-bit values need)."""
    n_words, cols = words.shape
    w = (words.to(torch.int64) & 0xFFFFFFFF).reshape(-1, bits, cols)
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
    word, shift = packing._positions(bits, words.device)
    pair = w[:, word] | (w[:, word + 1] << 32)
    return ((pair >> shift.view(1, 32, 1)) & (2**bits - 1)).reshape(-1, cols).to(torch.int32)


def baseline_dequantize_gptq(p: packing.GPTQPacked) -> torch.Tensor:
    codes = general_unpack_along_rows(p.qweight, 4).t().contiguous()
    zeros = general_unpack_along_rows(p.qzeros.t().contiguous(), 4).t().contiguous()
    g = p.g_idx.long()
    return p.scales.float()[g].t() * (codes.float() - zeros.float()[g].t())


def baseline_dequantize_awq(p: packing.AWQPacked) -> torch.Tensor:
    def unpack_columns(words):
        w = words.to(torch.int64) & 0xFFFFFFFF
        nibbles = (w.unsqueeze(2) >> (4 * torch.arange(8, dtype=torch.int64))) & 0xF
        return nibbles[:, :, list(packing.AWQ_REVERSE_ORDER)].reshape(words.shape[0], -1).to(torch.int32)

    codes, zeros = unpack_columns(p.qweight).t().contiguous(), unpack_columns(p.qzeros)
    g = torch.arange(codes.shape[1]) // (codes.shape[1] // p.scales.shape[0])
    return p.scales.float()[g].t() * (codes.float() - zeros.float()[g].t())


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of " + ", ".join(SHAPES))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "dequantize_cpu.json")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in args.shapes.split(","):
        out_f, in_f = SHAPES[name]
        codes = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32, generator=gen)
        zeros = torch.randint(1, 16, (in_f // GROUP, out_f), dtype=torch.int32, generator=gen)
        scales = (torch.rand(in_f // GROUP, out_f, generator=gen) * 0.01).half()
        consecutive = torch.arange(in_f) // GROUP
        cases = {
            "gptq": (packing.pack_gptq(codes, zeros, scales, consecutive, 4, v1=False),
                     lambda p: packing.dequantize_gptq(p, 4, v1=False), baseline_dequantize_gptq),
            "gptq act-order": (packing.pack_gptq(codes, zeros, scales, consecutive[torch.randperm(in_f, generator=gen)],
                                                 4, v1=False),
                               lambda p: packing.dequantize_gptq(p, 4, v1=False), baseline_dequantize_gptq),
            "awq": (packing.pack_awq(codes, zeros, scales), packing.dequantize_awq, baseline_dequantize_awq),
        }
        for case, (packed, ours, baseline) in cases.items():
            if not torch.equal(ours(packed), baseline(packed)):
                raise SystemExit(f"{name} {case}: dequantize differs from the plain formula")
            t_ours, t_base = [], []
            for _ in range(args.repeats):  # taking turns: a busy moment hits both
                t_base.append(_seconds(lambda: baseline(packed)))
                t_ours.append(_seconds(lambda: ours(packed)))
            rows.append({"shape": name, "out": out_f, "in": in_f, "case": case,
                         "baseline_seconds": statistics.median(t_base), "seconds": statistics.median(t_ours),
                         "speedup": statistics.median(t_base) / statistics.median(t_ours)})
        awq = cases["awq"][0]
        repack = statistics.median(_seconds(lambda: packing.gptq_from_awq(awq)) for _ in range(args.repeats))
        rows.append({"shape": name, "out": out_f, "in": in_f, "case": "awq -> gptq repack (load)",
                     "seconds": repack})
    print(f"{'shape':<10} {'case':<26} {'plain formula s':>16} {'ours s':>8} {'speedup':>8}")
    for r in rows:
        base = f"{r['baseline_seconds']:.3f}" if "baseline_seconds" in r else "-"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        print(f"{r['shape']:<10} {r['case']:<26} {base:>16} {r['seconds']:>8.3f} {speed:>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "dequantize_cpu", "group_size": GROUP, "repeats": args.repeats, "rows": rows,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "loadavg_at_end": list(os.getloadavg())}, indent=1))  # other jobs on the cores slow both sides
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
