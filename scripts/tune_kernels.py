"""Launch-configuration sweep of the W4A16 small-M path and NF4 dequantize on a CUDA device.

The wrappers in qlora_kernels/triton_kernels.py choose their tiles with `_w4a16_config`, their
split-K with `_split_k` and NF4 dequantize's blocks per program with `_nf4_dequantize_rows`
and `NF4_DEQUANTIZE_WARPS`. This script swaps those choices for each candidate in turn and
times the wrapper itself under scripts/bench_kernels.py's protocol (weights rotated over
copies larger than 2x L2, CUDA-graph replay, median of --reps), after checking its output
against the plain-torch twin (relative error <= 1e-2, else the candidate is dropped).

W4A16 split-K: Llama-3-8B shapes, GPTQ and AWQ layouts (group 128), M = 1 and 16, with the
GEMV off (the split-K kernel's own tiles). First every tile (BN, BK, warps, stages) with the
current split rule; then, for the two best tiles, other split-K targets (waves of programs per
SM count). NF4 dequantize (first, it is quick): blocks per program x warps.

GEMV (the path M <= GEMV_MAX_M takes): W4A16 GPTQ and AWQ and the NF4 forward, M = 1, 4 and
16: every GEMV tile (BN x BK x warps; BK within the group / block), then the two best at each
split-K target (WAVES); each case also times the split-K kernel (GEMV off), so the JSON says
where the GEMV stops paying (GEMV_MAX_M).

Prints, per case, the current choice's time, the best candidate's, and a bf16 `F.linear` of
the same shape; writes benchmarks/kernel_tuning_<device>.json (every candidate timed),
rewritten after each case so a run cut short keeps what it measured.

    python scripts/tune_kernels.py [--reps N] [--out PATH] [--quick] [--only gemv|split-k|nf4-dequantize]
    python scripts/tune_kernels.py --dry-run   # the cases and candidates, on any machine
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TILES = [dict(BN=bn, BK=bk, num_warps=w, num_stages=s)
         for bn, bk, w, s in itertools.product((64, 128, 256), (64, 128), (4, 8), (2, 4))]
WAVES = (1, 4, 8)
NF4_ROWS = (8, 16, 32, 64, 128)
NF4_WARPS = (2, 4, 8)
GEMV_MS = (1, 4, 16)
GEMV_BN = (32, 64, 128, 256)
GEMV_BK = (32, 64, 128)  # W4A16: within group 128; NF4: at most the block (64), larger ones dropped
GEMV_WARPS = (2, 4, 8)
GEMV_KINDS = ("gptq", "awq", "nf4")


GEMV_MAX_ACC = 128  # float32 partial sums per thread; bigger tiles would spill (and take long to compile)


def _gemv_acc(kind: str, bm: int, bn: int, bk: int) -> int:
    """Partial sums a GEMV program keeps (qlora_kernels/triton_kernels.py: GPTQ [BM, BK/8, BN], AWQ
    [BM, BK, BN], NF4 [BM, BN, BK/2])."""
    return bm * bn * {"gptq": bk // 8, "awq": bk, "nf4": bk // 2}[kind]


def gemv_candidates(kind: str, M: int, bm: int) -> list[dict]:
    """The GEMV tiles swept for one case: BN x BK x warps (BK at most the NF4 block), those
    whose partial sums fit GEMV_MAX_ACC registers per thread."""
    bks = [bk for bk in GEMV_BK if kind != "nf4" or bk <= 64]
    return [dict(BM=bm, BN=bn, BK=bk, num_warps=w) for bn, bk, w in itertools.product(GEMV_BN, bks, GEMV_WARPS)
            if _gemv_acc(kind, bm, bn, bk) <= GEMV_MAX_ACC * 32 * w]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "scripts" / "bench_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Swap:
    """Replaces module attributes for the duration of a `with` block."""

    def __init__(self, module, **values):
        self.module, self.values, self.saved = module, values, {}

    def __enter__(self):
        for k, v in self.values.items():
            self.saved[k] = getattr(self.module, k)
            setattr(self.module, k, v)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(self.module, k, v)


def _split_rule(tk, waves: int):
    def split_k(out_tiles, red_tiles, device):
        want = -(-waves * tk._sm_count(device) // max(out_tiles, 1))
        return max(1, min(32, red_tiles // 2, want))
    return split_k


def _time(bench, calls, reps):
    return bench.time_calls(calls, reps)["us"]


def tune_w4a16(bench, tk, reference, shapes, ms, reps, log):
    import torch.nn.functional as F

    l2 = bench._l2_bytes()
    for layer, K, N in shapes:
        for layout in ("gptq", "awq"):
            n = bench._copies(bench._w4_bytes(K, N), l2)
            ws = [bench._random_w4a16(K, N, layout, False) for _ in range(n)]
            bf16 = [torch.randn(N, K, device=bench.DEVICE, dtype=bench.DTYPE) * 0.02
                    for _ in range(bench._copies(2 * K * N, l2))]
            for M in ms:
                x = torch.randn(M, K, device=bench.DEVICE, dtype=bench.DTYPE)
                want = reference.w4a16_matmul(x, ws[0])
                calls = [lambda w=w: tk.w4a16_matmul(x, w) for w in ws]
                with Swap(tk, GEMV_MAX_M=0):  # the split-K kernel's own tiles
                    current_us = _time(bench, calls, reps)
                case = {"layer": layer, "K": K, "N": N, "layout": layout, "M": M,
                        "current": {"config": tk._w4a16_config(M, bench.GROUP)._asdict(), "us": current_us},
                        "bf16_us": _time(bench, [lambda w=w: F.linear(x, w) for w in bf16], reps), "candidates": []}

                def trial(cfg, waves):
                    swaps = {"_w4a16_config": lambda m, g, c=cfg: tk.W4A16Config(BM=16, **c), "GEMV_MAX_M": 0}
                    if waves is not None:
                        swaps["_split_k"] = _split_rule(tk, waves)
                    with Swap(tk, **swaps):
                        try:
                            err = bench.rel_error(tk.w4a16_matmul(x, ws[0]), want)
                            us = _time(bench, calls, reps) if err <= bench.CHECK_TOLERANCE else None
                        except Exception as exc:  # e.g. out of shared memory for this tile
                            err, us = None, None
                            log(f"  {cfg} waves={waves}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    case["candidates"].append({"config": cfg, "waves": waves, "us": us, "rel_error": err})
                    return us

                for cfg in TILES:
                    trial(cfg, None)
                ranked = sorted((c for c in case["candidates"] if c["us"] is not None), key=lambda c: c["us"])
                for c in ranked[:2]:
                    for waves in WAVES:
                        trial(c["config"], waves)
                best = min((c for c in case["candidates"] if c["us"] is not None), key=lambda c: c["us"])
                case["best"] = best
                log(f"{layer:8s} {K:5d}x{N:<5d} {layout:4s} M={M:<3d} current {case['current']['us']:8.2f} us  "
                    f"best {best['us']:8.2f} us {best['config']} waves={best['waves']}  bf16 {case['bf16_us']:8.2f} us  "
                    f"best/bf16 speedup {case['bf16_us'] / best['us']:.2f}x")
                yield case
            del ws, bf16
            torch.cuda.empty_cache()


def tune_gemv(bench, tk, reference, shapes, ms, reps, log, kinds=GEMV_KINDS):
    """The GEMV's tiles and split per (shape, kind, M): swaps `_w4a16_gemv_config` /
    `_nf4_gemv_config` (and `_split_k`) for each candidate; every candidate's output is checked
    against the twin first."""
    import torch.nn.functional as F

    l2 = bench._l2_bytes()
    for layer, K, N in shapes:
        bf16 = [torch.randn(N, K, device=bench.DEVICE, dtype=bench.DTYPE) * 0.02
                for _ in range(bench._copies(2 * K * N, l2))]
        for kind in kinds:
            if kind == "nf4":
                weights = [bench._random_nf4(K, N) for _ in range(bench._copies(bench._nf4_bytes(K, N), l2))]
                run, twin, swap_name = tk.nf4_matmul, reference.nf4_matmul, "_nf4_gemv_config"
                current = lambda M: tk._nf4_gemv_config(M, bench.NF4_BLOCK)  # noqa: E731
            else:
                weights = [bench._random_w4a16(K, N, kind, False) for _ in range(bench._copies(bench._w4_bytes(K, N), l2))]
                run, twin, swap_name = tk.w4a16_matmul, reference.w4a16_matmul, "_w4a16_gemv_config"
                current = lambda M, awq=kind == "awq": tk._w4a16_gemv_config(M, bench.GROUP, awq)  # noqa: E731
            for M in ms:
                x = torch.randn(M, K, device=bench.DEVICE, dtype=bench.DTYPE)
                want = twin(x, weights[0])
                calls = [lambda w=w: run(x, w) for w in weights]
                with Swap(tk, GEMV_MAX_M=0):
                    split_k_us = _time(bench, calls, reps)
                case = {"layer": layer, "K": K, "N": N, "kind": kind, "M": M,
                        "current": {"config": current(M)._asdict(), "us": _time(bench, calls, reps)},
                        "split_k_us": split_k_us,
                        "bf16_us": _time(bench, [lambda w=w: F.linear(x, w) for w in bf16], reps), "candidates": []}

                def trial(cfg, waves):
                    swaps = {swap_name: lambda *a, c=cfg: tk.GemvConfig(**c)}
                    if waves is not None:
                        swaps["_split_k"] = _split_rule(tk, waves)
                    with Swap(tk, **swaps):
                        try:
                            err = bench.rel_error(run(x, weights[0]), want)
                            us = _time(bench, calls, reps) if err <= bench.CHECK_TOLERANCE else None
                        except Exception as exc:  # e.g. out of registers or shared memory
                            err, us = None, None
                            log(f"  {cfg} waves={waves}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    case["candidates"].append({"config": cfg, "waves": waves, "us": us, "rel_error": err})

                for cfg in gemv_candidates(kind, M, tk._gemv_bm(M)):
                    trial(cfg, None)
                ranked = sorted((c for c in case["candidates"] if c["us"] is not None), key=lambda c: c["us"])
                for c in ranked[:2]:
                    for waves in WAVES:
                        trial(c["config"], waves)
                best = min((c for c in case["candidates"] if c["us"] is not None), key=lambda c: c["us"])
                case["best"] = best
                log(f"gemv {layer:8s} {K:5d}x{N:<5d} {kind:4s} M={M:<3d} current {case['current']['us']:8.2f} us  "
                    f"best {best['us']:8.2f} us {best['config']} waves={best['waves']}  split-K {split_k_us:8.2f} us  "
                    f"bf16 {case['bf16_us']:8.2f} us  best/bf16 speedup {case['bf16_us'] / best['us']:.2f}x")
                yield case
            del weights
            torch.cuda.empty_cache()
        del bf16


def dry_run(bench, shapes) -> None:
    """What a sweep would time, without a GPU (nothing is imported from the kernels)."""
    print(f"dry run: shapes {[s[0] for s in shapes]} (Llama-3-8B)")
    print(f"nf4_dequantize: rows per program {NF4_ROWS} x warps {NF4_WARPS}")
    print(f"w4a16 split-K (GEMV off), gptq and awq, M = 1, 16: {len(TILES)} tiles, then the best two x waves {WAVES}")
    for kind in GEMV_KINDS:
        for M in GEMV_MS:
            bm = 1 if M <= 1 else 4 if M <= 4 else 16  # qlora_kernels/triton_kernels.py _gemv_bm
            print(f"gemv {kind} M = {M}: {len(gemv_candidates(kind, M, bm))} tiles (BN {GEMV_BN} x BK "
                  f"{[bk for bk in GEMV_BK if kind != 'nf4' or bk <= 64]} x warps {GEMV_WARPS}, at most "
                  f"{GEMV_MAX_ACC} partial sums per thread), "
                  f"then the best two x waves {WAVES}; also the split-K kernel and bf16 F.linear")


def tune_nf4_dequantize(bench, tk, reference, shapes, reps, log):
    l2 = bench._l2_bytes()
    for layer, K, N in shapes:
        n = bench._copies(bench._nf4_bytes(K, N), l2)
        ts = [bench._random_nf4(K, N) for _ in range(n)]
        want = reference.nf4_dequantize(ts[0], bench.DTYPE)
        calls = [lambda t=t: tk.nf4_dequantize(t, bench.DTYPE) for t in ts]
        case = {"layer": layer, "K": K, "N": N, "kernel": "nf4_dequantize",
                "current": {"rows": tk._nf4_dequantize_rows(64), "num_warps": tk.NF4_DEQUANTIZE_WARPS,
                            "us": _time(bench, calls, reps)}, "candidates": []}
        for rows, warps in itertools.product(NF4_ROWS, NF4_WARPS):
            with Swap(tk, _nf4_dequantize_rows=lambda bs, r=rows: r, NF4_DEQUANTIZE_WARPS=warps):
                ok = torch.equal(tk.nf4_dequantize(ts[0], bench.DTYPE), want)
                us = _time(bench, calls, reps) if ok else None
            case["candidates"].append({"rows": rows, "num_warps": warps, "us": us, "exact": ok})
        best = min((c for c in case["candidates"] if c["us"] is not None), key=lambda c: c["us"])
        case["best"] = best
        moved = K * N // 2 + K * N // 64 + 2 * K * N  # packed + absmax codes read, bf16 written
        log(f"nf4_dequantize {layer:8s} {K:5d}x{N:<5d} current {case['current']['us']:8.2f} us  best {best['us']:8.2f} us "
            f"rows={best['rows']} warps={best['num_warps']}  ({moved / best['us'] / 1e3:.0f} GB/s)")
        yield case
        del ts
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per timing; the median is kept (default 5)")
    parser.add_argument("--quick", action="store_true", help="the two largest Llama-3-8B shapes only (down, gate_up)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/kernel_tuning_<device>.json)")
    parser.add_argument("--only", choices=("gemv", "split-k", "nf4-dequantize"), default=None,
                        help="run one sweep only (default all three)")
    parser.add_argument("--dry-run", action="store_true", help="list the cases and candidates; time nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        bench = _bench()
        dry_run(bench, [s for s in bench.SHAPES["llama3-8b"] if s[0] in ("down", "gate_up")] if args.quick
                else sorted(bench.SHAPES["llama3-8b"], key=lambda s: -s[1] * s[2]))
        return 0
    if not torch.cuda.is_available():
        print("error: this sweep needs a CUDA device (none is visible)", file=sys.stderr)
        return 2
    import triton

    bench = _bench()
    from qlora_kernels import reference
    from qlora_kernels import triton_kernels as tk

    device = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = Path(args.out) if args.out else REPO / "benchmarks" / f"kernel_tuning_{slug}.json"
    shapes = [s for s in bench.SHAPES["llama3-8b"] if s[0] in ("down", "gate_up")] if args.quick \
        else sorted(bench.SHAPES["llama3-8b"], key=lambda s: -s[1] * s[2])
    doc = {"device": device, "when": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
           "triton": triton.__version__, "reps": args.reps, "protocol": "as scripts/bench_kernels.py (CUDA graphs, "
           "weights rotated over copies > 2x L2, median); bf16 activations; group 128", "w4a16": [], "nf4_dequantize": [],
           "gemv": []}

    def log(line):
        print(line, flush=True)

    def save():
        out.write_text(json.dumps(doc, indent=1))

    if args.only in (None, "nf4-dequantize"):
        for case in tune_nf4_dequantize(bench, tk, reference, shapes, args.reps, log):
            doc["nf4_dequantize"].append(case)
            save()
    if args.only in (None, "gemv"):
        for case in tune_gemv(bench, tk, reference, shapes, GEMV_MS, args.reps, log):
            doc["gemv"].append(case)
            save()
    if args.only in (None, "split-k"):
        for case in tune_w4a16(bench, tk, reference, shapes, (1, 16), args.reps, log):
            doc["w4a16"].append(case)
            save()
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
