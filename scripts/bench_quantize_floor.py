"""GPTQ's stage time against its floor: the forward passes it must make over the calibration set.

The floor is two forwards of every decoder layer over the calibration windows (one to
capture the inputs whose Hessians GPTQ needs, one to compute the next layer's inputs with
the quantized weights), timed here in the same process as the quantization itself, with the
same compute dtype. The ratio says how much the solve, the extra true-sequential passes
(each group's Hessian is captured after the groups before it are quantized) and the packing add.

    python scripts/bench_quantize_floor.py RUN_DIR [--method gptq] [--group-size 64]
        [--compute-dtype float32|bfloat16] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from safetensors.torch import load_file

    from qlora_pipeline.compute import DTYPES
    from qlora_pipeline.layerwise.checkpoints import read_config, read_prefix, weight_map
    from qlora_pipeline.compute import compute_context
    from qlora_pipeline.layerwise.engine import _first_inputs, _forward
    from qlora_pipeline.layerwise.families import family_for
    from qlora_pipeline.layerwise.runner import LayerwiseRunner
    from qlora_pipeline.methods.checkpoint import quantize_checkpoint
    from qlora_pipeline.recipe import QuantizeEntry
    from qlora_pipeline.stages.calibrate import CALIBRATION_FILE

    merged = args.run_dir / "merge" / "output"
    calibration = load_file(str(args.run_dir / "calibrate" / "output" / CALIBRATION_FILE))["input_ids"]
    config = read_config(merged)
    family = family_for(config["model_type"])
    dtype = DTYPES[args.compute_dtype]

    t0 = time.time()  # the floor: two forwards of every layer over the calibration windows
    runner = LayerwiseRunner(config, torch.float32, family)
    wmap = weight_map(merged)
    with torch.no_grad():  # as the engine runs (without it autograd kept every layer's activations: 20 GB)
        hidden, pos_ids, pos_emb = _first_inputs(runner, wmap, family, calibration)
        for i, layer in enumerate(runner.layers):
            runner.materialize(layer, read_prefix(wmap, family.layer_prefix(i)), torch.float32)
            with compute_context(dtype):  # the capture pass: a forward whose outputs are dropped
                for _, x in hidden.batches():
                    layer(x, attention_mask=None, position_ids=pos_ids, position_embeddings=pos_emb)
            _forward(layer, hidden, pos_ids, pos_emb, dtype)  # the next layer's inputs, in place
            layer.to("meta")
    floor = time.time() - t0

    entry = QuantizeEntry(name="m", method=args.method, group_size=args.group_size, desc_act=True,
                          static_groups=True, compute_dtype=args.compute_dtype)
    with tempfile.TemporaryDirectory() as tmp_name:
        ckpt, out = Path(tmp_name) / "ckpt", Path(tmp_name) / "out"
        ckpt.mkdir()
        out.mkdir()
        t0 = time.time()
        quantize_checkpoint(merged, calibration, entry, torch.bfloat16, ckpt, out, lambda it, **kw: it,
                            lambda i, m: None)
        stage = time.time() - t0
    row = {"method": args.method, "group_size": args.group_size, "compute_dtype": args.compute_dtype,
           "calibration": list(calibration.shape), "layers": len(runner.layers), "floor_seconds": floor,
           "quantize_seconds": stage, "ratio": stage / floor}
    print(f"{args.method} g{args.group_size}, {calibration.shape[0]}x{calibration.shape[1]} calibration tokens, "
          f"{args.compute_dtype} forwards: floor (2 forwards/layer) {floor:.1f} s, quantize {stage:.1f} s, "
          f"ratio {stage / floor:.2f}")
    out_path = args.out or REPO / "benchmarks" / f"quantize_floor_{args.method}_{args.compute_dtype}.json"
    out_path.write_text(json.dumps({**row, "cpus": os.cpu_count(), "machine": platform.machine(),
                                    "torch": torch.__version__}, indent=2))
    print(f"written {out_path}")


if __name__ == "__main__":
    main()
