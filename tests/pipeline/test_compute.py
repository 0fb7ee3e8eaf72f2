"""`dtype: auto`, and the layer engine's calibration forwards in bf16."""
from __future__ import annotations

import pytest
import torch

from qlora_pipeline import compute, dtypes


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Sets whether the CPU counts as computing bf16 natively (QLP_CPU_BF16), detection cache cleared."""
    def set_(native: bool):
        monkeypatch.setenv("QLP_CPU_BF16", "1" if native else "0")
        dtypes.cpu_native_bf16.cache_clear()
    yield set_
    dtypes.cpu_native_bf16.cache_clear()


def test_auto_is_bf16_on_cuda_and_on_a_cpu_with_native_bf16_else_float32(cpu_bf16):
    cpu_bf16(False)
    assert compute.auto_dtype("cpu") == torch.float32
    cpu_bf16(True)
    assert compute.auto_dtype("cpu") == torch.bfloat16
    # calibration forwards and CPU training stay float32 (README "CPU bf16")
    assert dtypes.quantize_dtype_name("auto") == "float32"
    assert dtypes.quantize_dtype_name("bfloat16") == "bfloat16"
    assert dtypes.train_dtype_name("auto", "cpu") == "float32"
    assert dtypes.train_dtype_name("auto", "cuda", cuda_dtype="float16") == "float16"
    assert compute.auto_dtype("cuda") == torch.bfloat16
    assert compute.auto_dtype("cuda", cuda_dtype=torch.float16) == torch.float16
    assert compute.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert compute.resolve_dtype("float32", "cuda") == torch.float32


@pytest.mark.parametrize("flags,native", [("fpu sse avx512f avx512_bf16 avx512_vnni", True),
                                          ("fpu sse amx_tile amx_bf16", True),
                                          ("fpu sse avx2 avx512f avx512bw", False)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, monkeypatch, flags, native):
    monkeypatch.delenv("QLP_CPU_BF16", raising=False)
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert dtypes.cpu_native_bf16.__wrapped__(info) is native
    assert dtypes.cpu_native_bf16.__wrapped__(tmp_path / "absent") is False  # no /proc/cpuinfo: float32


def test_the_resolved_dtypes_are_in_the_fingerprints(cpu_bf16, write_recipe):
    """A stage computed in bf16 is not the float32 one: `auto` resolves into the settings of
    the evaluations and of training (a quantize entry's `auto` is float32 everywhere, so its
    setting as written is the fingerprint); on the CPU only the evaluations change."""
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages import build_stages

    path = write_recipe({"quantize": [{"name": "r", "method": "rtn", "group_size": 64},
                                      {"name": "g", "method": "gptq", "group_size": 64}]})
    recipe, _ = load_recipe(path, [])
    settings = {}
    for native in (False, True):
        cpu_bf16(native)
        settings[native] = {s.name: s.config for s in build_stages(recipe)}
    changed = {name for name in settings[True] if settings[True][name] != settings[False][name]}
    assert {"evaluate-base", "evaluate-merged", "evaluate-r", "evaluate-g"} <= changed
    assert not changed & {"data", "base", "train", "merge", "calibrate", "quantize-r", "quantize-g"}
    assert settings[True]["train"]["compute_dtype"] == "float32"  # CPU training stays float32
    assert settings[False]["evaluate-g"]["evaluate"]["dtype"] == "float32"


def test_compute_context_autocasts_matmuls_only_below_float32():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with compute.compute_context(torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with compute.compute_context(torch.float32):
        assert (a @ b).dtype == torch.float32


def test_the_engine_in_bf16_quantizes_close_to_float32(tiny_llama_dir, tmp_path):
    """Same calibration, forwards in bf16 or fp32: the Hessians stay float32 and close."""
    from qlora_pipeline.layerwise.checkpoints import read_config
    from qlora_pipeline.layerwise.engine import quantize_sequentially
    from qlora_pipeline.layerwise.families import LLAMA
    from qlora_pipeline.methods import gptq_format
    from qlora_pipeline.recipe import QuantizeEntry
    from qlora_quant.gptq import gptq_quantize

    entry = QuantizeEntry(name="g", method="gptq", group_size=32)
    vocab = read_config(tiny_llama_dir)["vocab_size"]
    ids = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(0))
    seen: dict[str, list] = {"float32": [], "bfloat16": []}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        def quantize(n, W, H, name=name):
            assert H.dtype == torch.float32
            seen[name].append(H)
            return gptq_format.pack(gptq_quantize(W, H, 4, 32, scale_dtype=torch.float16), entry, H)
        ckpt = tmp_path / name
        ckpt.mkdir()
        quantize_sequentially(tiny_llama_dir, ids, LLAMA, torch.bfloat16, ckpt, quantize,
                              lambda n, s: gptq_format.restore(s, 4), True, lambda it, **k: it, lambda i, m: None,
                              compute_dtype=dtype)
    # q/k/v of the first layer read the normed embeddings: no matmul before them, the same Hessian.
    assert torch.allclose(seen["float32"][0], seen["bfloat16"][0], rtol=1e-5, atol=1e-6)
    drift = [float((a - b).abs().max() / a.abs().max()) for a, b in zip(seen["float32"], seen["bfloat16"])]
    assert 0 < max(drift) < 0.1  # later inputs went through bf16 matmuls, and stay close


def test_the_resolved_evaluation_device_is_in_the_fingerprints(write_recipe, monkeypatch):
    """An evaluation measures perplexity, speed and peak memory on its device: `auto` resolved
    to cuda is not the CPU's evaluation (nor served from the stage cache for it), even with the
    dtype written out; the other stages keep their settings."""
    from qlora_pipeline import devices
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages import build_stages

    recipe, _ = load_recipe(write_recipe({"evaluate": {"dtype": "float32"},
                                          "quantize": [{"name": "r", "method": "rtn", "group_size": 64}]}), [])
    settings = {}
    for missing in ("no GPU", None):
        monkeypatch.setattr(devices, "cuda_missing", lambda: missing)
        settings[missing] = {s.name: s.config for s in build_stages(recipe)}
    changed = {name for name in settings[None] if settings[None][name] != settings["no GPU"][name]}
    assert {"evaluate-base", "evaluate-base-nf4", "evaluate-merged", "evaluate-r"} <= changed
    assert settings["no GPU"]["evaluate-r"]["evaluate"]["device"] == "cpu"
    assert settings[None]["evaluate-r"]["evaluate"]["device"] == "cuda"
    assert not changed & {"data", "base", "merge"}


@pytest.mark.parametrize("change, unchanged", [
    ({"evaluate": {"device": "cpu", "dtype": "float32"}}, "every"),  # what auto resolves to on this machine
    ({"train": {"save_interval": 3, "keep_checkpoints": 5}}, "every"),  # how often training checkpoints
    ({"model": {"dtype": "float32"}}, "data"),  # the tokens do not depend on it
])
def test_a_setting_that_changes_no_output_re_runs_nothing(change, unchanged, write_recipe, monkeypatch, cpu_bf16):
    """These re-ran stages whose output they cannot change: an explicit evaluation device and
    dtype equal to what auto gives re-ran every evaluation, the checkpoint interval re-trained,
    the weights' dtype re-tokenized."""
    from qlora_pipeline import devices
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages import build_stages

    monkeypatch.setattr(devices, "cuda_missing", lambda: "no GPU")
    cpu_bf16(False)
    base = {"quantize": [{"name": "r", "method": "rtn", "group_size": 64}]}
    specs = {}
    for name, recipe in (("before", base), ("after", {**base, **change})):
        specs[name] = {s.name: s.config for s in build_stages(load_recipe(write_recipe(recipe), [])[0])}
    same = {n for n in specs["before"] if specs["before"][n] == specs["after"][n]}
    assert same == set(specs["before"]) if unchanged == "every" else unchanged in same
    if "train" in change:  # the stage still gets them
        train = next(s for s in build_stages(load_recipe(write_recipe({**base, **change}), [])[0]) if s.name == "train")
        assert (train.runtime["save_interval"], train.runtime["keep_checkpoints"]) == (3, 5)
