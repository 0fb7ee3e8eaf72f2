"""The calibrate and quantize stages: packed GPTQ checkpoints, resume after kill -9, recipe errors."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, cli, make_tiny_llama, random_adapter, tiny_recipe

QUANTIZE = [
    {"name": "rtn", "method": "rtn", "group_size": 32},
    {"name": "gptq", "method": "gptq", "group_size": 32, "desc_act": True},
    {"name": "gptq-sym", "method": "gptq", "group_size": 32, "sym": True, "desc_act": True, "static_groups": True},
]




def quant_recipe(model_dir, tmp_path, name, adapter, quantize=QUANTIZE):
    r = tiny_recipe(model_dir, tmp_path, run={"name": name}, tracking={"enabled": False},
                    merge={"adapter": str(adapter)}, calibration={"samples": 8, "seq_len": 128})
    r["quantize"] = quantize
    return r


def test_quantized_artifacts_are_standard_gptq_checkpoints(tiny_llama_dir, tmp_path, write_recipe, monkeypatch):
    monkeypatch.chdir(tmp_path)
    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter")
    path = write_recipe(quant_recipe(tiny_llama_dir, tmp_path, "q", adapter))
    assert cli("run", str(path)) == 0
    run_dir = tmp_path / "runs" / "q"
    calib = load_file(str(run_dir / "calibrate" / "output" / "calibration.safetensors"))["input_ids"]
    assert calib.shape == (8, 128) and calib.dtype == torch.int64

    for name, fmt in (("rtn", None), ("gptq", None), ("gptq-sym", "gptq")):
        out = run_dir / f"quantize-{name}" / "output"
        qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qcfg["quant_method"] == "gptq" and qcfg["bits"] == 4 and qcfg["group_size"] == 32
        assert json.loads((out / "quantize_config.json").read_text()) == qcfg
        if fmt:
            assert qcfg["checkpoint_format"] == fmt
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        for suffix, in_f in (("self_attn.q_proj", 64), ("mlp.down_proj", 128)):
            shard = load_file(str(out / index[f"model.layers.1.{suffix}.qweight"]))
            assert shard[f"model.layers.1.{suffix}.qweight"].shape[0] == in_f // 8
            assert shard[f"model.layers.1.{suffix}.g_idx"].shape == (in_f,)
            assert f"model.layers.1.{suffix}.weight" not in index
        assert index["model.layers.1.input_layernorm.weight"]
        assert "model.embed_tokens.weight" in index

    sym = load_file(str(next((run_dir / "quantize-gptq-sym" / "output").glob("model-00001-*"))))
    assert all((v & 0xFFFFFFFF == 0x77777777).all() for k, v in sym.items() if k.endswith(".qzeros"))
    report = json.loads((run_dir / "report" / "output" / "metrics.json").read_text())["artifacts"]
    assert {"rtn", "gptq", "gptq-sym"} <= set(report)
    assert report["gptq"]["quantize_seconds"] > 0
    layer_metrics = json.loads((run_dir / "quantize-gptq" / "output" / "layer_metrics.json").read_text())
    assert len(layer_metrics) == 3 and "down_proj.loss" in layer_metrics[0]


def test_evaluation_reads_the_packed_checkpoint(tiny_llama_dir, tmp_path, write_recipe, monkeypatch):
    """The int4 model computes with exactly the weights GPTQ chose."""
    from qlora_pipeline.layerwise.checkpoints import load_int4_model

    monkeypatch.chdir(tmp_path)
    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter")
    path = write_recipe(quant_recipe(tiny_llama_dir, tmp_path, "q", adapter, QUANTIZE[1:2]))
    assert cli("run", str(path), "--only", "data") == 0
    for stage in ("base", "merge", "calibrate", "quantize-gptq"):
        assert cli("run", str(path), "--only", stage) == 0
    model = load_int4_model(tmp_path / "runs" / "q" / "quantize-gptq" / "output", torch.float32, "cpu")
    w = model.model.layers[0].mlp.down_proj.dequantized_weight()
    merged = load_file(str(next((tmp_path / "runs" / "q" / "merge" / "output").glob("model-00001-*"))))
    ref = merged["model.layers.0.mlp.down_proj.weight"].float()
    assert w.shape == ref.shape and 0 < (w - ref).abs().max() < ref.abs().max()


@pytest.mark.parametrize("entry, killed_stage", [
    ({"name": "gptq", "method": "gptq", "group_size": 64, "desc_act": True}, "quantize-gptq"),
    # the search quantizes as AWQ does, layer by layer: killed there, and killed applying it
    ({"name": "awq", "method": "awq", "group_size": 64, "awq": {"search_windows": 4}}, "awq-search-w4g64"),
    ({"name": "awq", "method": "awq+gptq", "group_size": 64, "awq": {"search_windows": 4}}, "quantize-awq"),
], ids=["gptq", "awq-search", "awq+gptq"])
def test_kill_9_during_quantize_resumes_to_the_same_checkpoint(tmp_path, smollm2_dir, write_recipe, entry, killed_stage):
    deep = make_tiny_llama(tmp_path / "deep", smollm2_dir, layers=8, hidden=256, intermediate=768)
    adapter = random_adapter(deep, tmp_path / "adapter")
    stage = f"quantize-{entry['name']}"
    files = "awq-*.safetensors" if killed_stage.startswith("awq-search") else "layer-*.safetensors"
    hashes = {}
    for name in ("ref", "killed"):
        path = write_recipe(quant_recipe(deep, tmp_path, name, adapter, [entry]), f"{name}.yaml")
        searched = ("awq-search-w4g64",) if entry["method"] != "gptq" and killed_stage == stage else ()
        for s in ("data", "base", "merge", "calibrate", *searched):
            assert cli("run", str(path), "--only", s) == 0
        env = dict(os.environ)
        cmd = [sys.executable, "-m", "qlora_pipeline.cli", "run", str(path), "--only"]
        if name == "killed":
            ckpt = tmp_path / "runs" / name / killed_stage / "checkpoints"
            proc = subprocess.Popen(cmd + [killed_stage], cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
            deadline = time.time() + 300
            while time.time() < deadline and len(list(ckpt.glob(files))) < 3:
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            assert 3 <= len(list(ckpt.glob(files))) < 8
            # Bit rot in a finished layer's checkpoint, size and mtime kept: it parses, and a
            # resume that trusted it computed every later layer from the wrong weights.
            damaged = sorted(ckpt.glob(files))[1]
            st, raw = damaged.stat(), bytearray(damaged.read_bytes())
            raw[-100] ^= 0xFF
            damaged.write_bytes(bytes(raw))
            os.utime(damaged, ns=(st.st_atime_ns, st.st_mtime_ns))
        for s in ([killed_stage] if killed_stage != stage else []) + [stage]:
            done = subprocess.run(cmd + [s], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
            assert done.returncode == 0, done.stderr[-3000:]
        hashes[name] = {}
        for s in {killed_stage, stage}:
            manifest = json.loads((tmp_path / "runs" / name / s / "manifest.json").read_text())
            hashes[name].update({f"{s}/{k}": v["sha256"] for k, v in manifest["files"].items()
                                 if k.endswith(".safetensors")})
    assert hashes["killed"] == hashes["ref"]


def test_group_size_that_does_not_divide_is_a_recipe_error(tiny_llama_dir, tmp_path, write_recipe, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter")
    path = write_recipe(quant_recipe(tiny_llama_dir, tmp_path, "bad", adapter,
                                     [{"name": "g", "method": "rtn", "group_size": 48}]))
    assert cli("run", str(path)) == 2
    err = capsys.readouterr().err
    assert "quantize.0.group_size: 48 does not divide the model's hidden_size 64" in err and "32" in err
    assert not (tmp_path / "runs").exists()  # found while planning: nothing written
    # An entry that leaves group_size out gets the default (128, wider than this model): say so.
    path = write_recipe(quant_recipe(tiny_llama_dir, tmp_path, "bad", adapter, [{"name": "g", "method": "rtn"}]))
    assert cli("validate", str(path)) == 2
    assert "quantize.0.group_size: 128 (the default) does not divide the model's hidden_size 64" in \
        capsys.readouterr().err


AWQ = [
    {"name": "awq", "method": "awq", "group_size": 32, "awq": {"search_windows": 4}},
    {"name": "awq-gptq", "method": "awq+gptq", "group_size": 32, "desc_act": True, "static_groups": True,
     "awq": {"search_windows": 4}},
]


def test_awq_checkpoints_are_standard_awq_gemm_and_gptq(tiny_llama_dir, tmp_path, write_recipe, monkeypatch):
    from qlora_pipeline.layerwise.checkpoints import load_int4_model
    from qlora_quant.packing import AWQPacked, dequantize_awq, unpack_awq

    monkeypatch.chdir(tmp_path)
    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter")
    path = write_recipe(quant_recipe(tiny_llama_dir, tmp_path, "a", adapter, AWQ))
    assert cli("run", str(path)) == 0
    run_dir = tmp_path / "runs" / "a"
    merged = load_file(str(next((run_dir / "merge" / "output").glob("model-00001-*"))))

    out = run_dir / "quantize-awq" / "output"
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: qcfg[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version")} == \
        {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shard = load_file(str(out / index["model.layers.0.mlp.down_proj.qweight"]))
    p = "model.layers.0.mlp.down_proj"
    assert shard[f"{p}.qweight"].shape == (128, 64 // 8) and shard[f"{p}.qweight"].dtype == torch.int32
    assert shard[f"{p}.qzeros"].shape == (128 // 32, 64 // 8) and shard[f"{p}.scales"].shape == (4, 64)
    assert f"{p}.g_idx" not in shard
    codes, zeros = unpack_awq(AWQPacked(shard[f"{p}.qweight"], shard[f"{p}.qzeros"], shard[f"{p}.scales"]))
    assert 0 <= int(codes.min()) and int(codes.max()) <= 15 and int(zeros.max()) <= 15
    # The scales were folded into the norms: they differ from the merged model's.
    norm = shard["model.layers.0.post_attention_layernorm.weight"]
    assert norm.dtype == torch.bfloat16 and not torch.equal(norm, merged["model.layers.0.post_attention_layernorm.weight"])
    layer_metrics = json.loads((run_dir / "quantize-awq" / "output" / "layer_metrics.json").read_text())
    searched = {k.split(".ratio")[0] for k in layer_metrics[0] if k.endswith(".ratio")}
    # grouped-query attention: v_proj cannot absorb o_proj's scales
    assert searched == {"awq.input_layernorm", "awq.post_attention_layernorm", "awq.mlp.up_proj"}
    assert "down_proj.output_rel_err" in layer_metrics[0]

    model = load_int4_model(out, torch.float32, "cpu")
    down = model.model.layers[0].mlp.down_proj  # held in the GPTQ layout the kernels read fastest
    assert down.layout == "gptq" and down.source_format == "awq-gemm" and not down.v1
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    stored = load_file(str(out / index["model.layers.0.mlp.down_proj.qweight"]))
    native = AWQPacked(*(stored[f"model.layers.0.mlp.down_proj.{k}"] for k in ("qweight", "qzeros", "scales")))
    assert torch.equal(down.dequantized_weight(), dequantize_awq(native))

    out = run_dir / "quantize-awq-gptq" / "output"
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["meta"]["quantizer"] == "qlora-pipeline:awq+gptq"
    assert load_int4_model(out, torch.float32, "cpu").model.layers[0].mlp.down_proj.layout == "gptq"

    report = json.loads((run_dir / "report" / "output" / "metrics.json").read_text())["artifacts"]
    seconds = {s: json.loads((run_dir / s / "manifest.json").read_text())["metrics"]["stage_seconds"]
               for s in ("awq-search-w4g32", "quantize-awq", "quantize-awq-gptq")}
    for name in ("awq", "awq-gptq"):
        # what making the artifact took: its stage and the shared search it applied
        assert report[name]["domain_ppl"] > 0 and report[name]["quantize_seconds"] == pytest.approx(
            seconds[f"quantize-{name}"] + seconds["awq-search-w4g32"], abs=1e-3)


def test_awq_gptq_entries_with_the_same_awq_settings_share_one_search(tiny_llama_dir, tmp_path, write_recipe, capsys):
    """awq and awq+gptq entries with the same AWQ settings apply one search stage."""
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages import build_stages

    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter")
    entries = AWQ + [{**AWQ[1], "name": "awq-gptq-plain", "desc_act": False, "static_groups": False}]
    path = write_recipe(quant_recipe(tiny_llama_dir, tmp_path, "s", adapter, entries))
    specs = {s.name: s for s in build_stages(load_recipe(path)[0])}
    assert [n for n in specs if "search" in n] == ["awq-search-w4g32"]
    assert "awq-search-w4g32" in specs["quantize-awq-gptq"].deps and "awq-search-w4g32" in specs["quantize-awq-gptq-plain"].deps
    assert "awq-search-w4g32" in specs["quantize-awq"].deps
    # Entries whose searches differ get one search stage each, named by their settings.
    differing = [AWQ[1], {**AWQ[1], "name": "other", "awq": {"clip": False}}]
    path = write_recipe(quant_recipe(tiny_llama_dir, tmp_path, "d", adapter, differing), "d.yaml")
    specs = {s.name: s for s in build_stages(load_recipe(path)[0])}
    searches = [n for n in specs if "search" in n]
    assert len(searches) == 2 and all(re.fullmatch(r"awq-search-w4g32-[0-9a-f]{6}", n) for n in searches)
    assert {specs[n].config["search"]["clip"] for n in searches} == {True, False}
    for entry in ("awq-gptq", "other"):
        (mine,) = [d for d in specs[f"quantize-{entry}"].deps if "search" in d]
        assert specs[mine].config["search"]["clip"] == (entry == "awq-gptq")
    assert cli("plan", str(path)) == 0


def test_awq_without_grouped_query_attention_scales_o_proj(tmp_path, smollm2_dir, write_recipe, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mha = make_tiny_llama(tmp_path / "mha", smollm2_dir, layers=2, kv_heads=4)
    adapter = random_adapter(mha, tmp_path / "adapter")
    path = write_recipe(quant_recipe(mha, tmp_path, "m", adapter, AWQ[:1]))
    for stage in ("data", "base", "merge", "calibrate", "awq-search-w4g32", "quantize-awq"):
        assert cli("run", str(path), "--only", stage) == 0
    layer_metrics = json.loads((tmp_path / "runs" / "m" / "quantize-awq" / "output" / "layer_metrics.json").read_text())
    assert all("awq.self_attn.v_proj.ratio" in m for m in layer_metrics)


def test_awq_recipe_errors(tiny_llama_dir, tmp_path, write_recipe, capsys):
    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter")
    for entry, message in (({"bits": 3}, "4-bit only"), ({"sym": True}, "sym: false"), ({"group_size": -1}, "group size"),
                           ({"awq": {"clips": True}}, "clips")):
        path = write_recipe(quant_recipe(tiny_llama_dir, tmp_path, "e", adapter, [{"name": "a", "method": "awq", **entry}]))
        assert cli("validate", str(path)) == 2
        assert message in capsys.readouterr().err


def test_awq_applying_the_search_stage_gives_the_bytes_of_searching_as_it_quantizes(tiny_llama_dir, tmp_path):
    """The search stage quantizes as AWQ alone does and keeps the search; AWQ applying it writes
    the same checkpoint, byte for byte, as AWQ searching layer by layer inside its own stage."""
    import torch

    from qlora_pipeline.methods.checkpoint import quantize_checkpoint, quantize_layers
    from qlora_pipeline.recipe import QuantizeEntry

    entry = QuantizeEntry(name="a", method="awq", group_size=32, awq={"search_windows": 2}, compute_dtype="float32")
    calibration = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    quiet, ignore = (lambda it, **kw: it), (lambda i, m: None)
    for d in ("in-place-ckpt", "in-place", "search", "applied-ckpt", "applied"):
        (tmp_path / d).mkdir()
    quantize_checkpoint(tiny_llama_dir, calibration, entry, torch.bfloat16, tmp_path / "in-place-ckpt",
                        tmp_path / "in-place", quiet, ignore)
    n = quantize_layers(tiny_llama_dir, calibration, entry, torch.bfloat16, tmp_path / "search", quiet, ignore)
    assert sorted(p.name for p in (tmp_path / "search").glob("awq-*.safetensors")) == [f"awq-{i:05d}.safetensors"
                                                                                      for i in range(n)]
    quantize_checkpoint(tiny_llama_dir, calibration, entry, torch.bfloat16, tmp_path / "applied-ckpt",
                        tmp_path / "applied", quiet, ignore, search_dir=tmp_path / "search")
    assert not list((tmp_path / "applied-ckpt").glob("awq-*.safetensors")), "applied, not searched again"
    written = sorted(p.name for p in (tmp_path / "in-place").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "applied").iterdir()) and "model.safetensors" in " ".join(written)
    for name in written:
        assert (tmp_path / "in-place" / name).read_bytes() == (tmp_path / "applied" / name).read_bytes(), name


def test_awq_entry_assembles_the_layers_its_search_stage_quantized(tiny_llama_dir, tmp_path, write_recipe,
                                                                     monkeypatch):
    """The search stage quantizes as `awq` does; where an `awq` entry applies it, the stage hands
    over those layers and the entry only assembles them (no calibration forward of its own): the
    checkpoint and metrics the entry's own pass over the layers gives, byte for byte. A search
    only `awq+gptq` entries apply keeps no layers."""
    import qlora_pipeline.stages.quantize as quantize_stage
    from qlora_pipeline.methods.checkpoint import quantize_checkpoint
    from qlora_pipeline.recipe import QuantizeEntry, load_recipe
    from qlora_pipeline.stages import build_stages

    monkeypatch.chdir(tmp_path)
    adapter = random_adapter(tiny_llama_dir, tmp_path / "adapter")
    path = write_recipe(quant_recipe(tiny_llama_dir, tmp_path, "h", adapter, AWQ))
    for stage in ("data", "base", "merge", "calibrate", "awq-search-w4g32"):
        assert cli("run", str(path), "--only", stage) == 0
    run_dir = tmp_path / "runs" / "h"
    search = run_dir / "awq-search-w4g32" / "output"
    assert (search / "awq-layers" / "layer-00000.safetensors").is_file()

    def no_quantizing(*args, **kwargs):
        raise AssertionError("the awq entry quantized its layers again")

    monkeypatch.setattr(quantize_stage, "quantize_checkpoint", no_quantizing)
    assert cli("run", str(path), "--only", "quantize-awq") == 0
    monkeypatch.undo()

    entry = QuantizeEntry.model_validate({**AWQ[0], "compute_dtype": "float32"})
    calibration = load_file(str(run_dir / "calibrate" / "output" / "calibration.safetensors"))["input_ids"]
    for d in ("ckpt", "own"):
        (tmp_path / d).mkdir()
    quantize_checkpoint(run_dir / "merge" / "output", calibration, entry, torch.bfloat16, tmp_path / "ckpt",
                        tmp_path / "own", lambda it, **kw: it, lambda i, m: None, search_dir=search)
    staged = run_dir / "quantize-awq" / "output"
    own = {p.name for p in (tmp_path / "own").iterdir()}
    assert own <= {p.name for p in staged.iterdir()} and "model.safetensors" in " ".join(own)
    for name in own:
        assert (staged / name).read_bytes() == (tmp_path / "own" / name).read_bytes(), name
    own_metrics = [json.loads(line) for line in (tmp_path / "ckpt" / "layer_metrics.jsonl").read_text().splitlines()]
    staged_metrics = json.loads((staged / "layer_metrics.json").read_text())
    assert staged_metrics == own_metrics and "down_proj.output_rel_err" in staged_metrics[0]

    only_gptq = write_recipe(quant_recipe(tiny_llama_dir, tmp_path, "g", adapter, AWQ[1:]), "g.yaml")
    specs = {s.name: s for s in build_stages(load_recipe(only_gptq)[0])}
    assert "publish_layers" not in specs["awq-search-w4g32"].config


def test_assembling_from_missing_layers_names_the_stage_to_rerun(tiny_llama_dir, tmp_path):
    from qlora_pipeline.errors import StageError
    from qlora_pipeline.methods.checkpoint import checkpoint_from_layers
    from qlora_pipeline.recipe import QuantizeEntry

    layers = tmp_path / "awq-layers"
    layers.mkdir()
    (layers / "layer-00000.safetensors").write_bytes(b"not a shard")
    for d in ("ckpt", "out"):
        (tmp_path / d).mkdir()
    entry = QuantizeEntry.model_validate(AWQ[0])
    n = json.loads((tiny_llama_dir / "config.json").read_text())["num_hidden_layers"]
    with pytest.raises(StageError, match=rf"{n} of {n} quantized layers missing or damaged \(layer-00000"):
        checkpoint_from_layers(layers, tiny_llama_dir, entry, torch.bfloat16, tmp_path / "ckpt", tmp_path / "out",
                               lambda i, m: None)
    assert not list((tmp_path / "out").iterdir())
