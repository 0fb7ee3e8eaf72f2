"""The layer engine's device and activation storage: host-streamed and resident activations give
the same bytes, bfloat16 storage stays within its stated tolerance, the device setting is a
recipe error where it cannot be honoured and is fingerprinted as resolved.

The CUDA paths (device memory, pinned host memory, non-blocking copies) run only where torch
sees a GPU; this project's CPU machines have none, so the CPU tests force the streaming path
(chunks copied in and written back) with storage: host."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_pipeline import devices
from qlora_pipeline.layerwise import engine
from qlora_pipeline.layerwise.checkpoints import read_config
from qlora_pipeline.methods import METHODS
from qlora_pipeline.methods.checkpoint import quantize_checkpoint
from qlora_pipeline.recipe import QuantizeEntry
from tests.conftest import cli, tiny_recipe

CUDA = torch.cuda.is_available()
ENTRIES = [
    {"name": "gptq", "method": "gptq", "group_size": 32, "desc_act": True, "static_groups": True},
    {"name": "awq", "method": "awq", "group_size": 32, "awq": {"search_windows": 4}},
]


def _ids(model_dir: Path, windows: int = 20, tokens: int = 48, seed: int = 0) -> torch.Tensor:
    # 20 windows: the last chunk of 8 is a partial one
    vocab = read_config(model_dir)["vocab_size"]
    return torch.randint(0, vocab, (windows, tokens), generator=torch.Generator().manual_seed(seed))


def _quantize(model_dir: Path, ids, entry: dict, out: Path, device: str = "cpu") -> dict[str, bytes]:
    (out / "ck").mkdir(parents=True)
    (out / "out").mkdir()
    quantize_checkpoint(model_dir, ids, QuantizeEntry(**entry), torch.bfloat16, out / "ck", out / "out",
                        lambda it, **k: it, lambda i, m: None, device=device)
    return {p.name: p.read_bytes() for p in sorted((out / "out").iterdir()) if p.suffix == ".safetensors"}


@pytest.fixture
def placements(monkeypatch):
    """The placement of every `Activations` the engine makes."""
    seen = []
    real = engine.Activations.__init__

    def spy(self, shape, dtype, device, placement, chunk):
        seen.append(placement)
        real(self, shape, dtype, device, placement, chunk)

    monkeypatch.setattr(engine.Activations, "__init__", spy)
    return seen


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_host_streamed_and_resident_activations_give_the_same_bytes(tiny_llama_dir, tmp_path, entry, placements):
    ids = _ids(tiny_llama_dir)
    resident = _quantize(tiny_llama_dir, ids, {**entry, "activations": {"storage": "device"}}, tmp_path / "resident")
    streamed = _quantize(tiny_llama_dir, ids, {**entry, "activations": {"storage": "host"}}, tmp_path / "streamed")
    assert placements == ["device", "host"]
    assert resident.keys() == streamed.keys() and len(resident) == 4  # 3 layers and the rest
    assert resident == streamed


def test_the_awq_search_streamed_gives_the_same_bytes(tiny_llama_dir, tmp_path, placements):
    from qlora_pipeline.layerwise.awq_search import make_transform
    from qlora_pipeline.layerwise.families import LLAMA
    from qlora_pipeline.methods.awq import settings

    ids = _ids(tiny_llama_dir)
    found = {}
    for storage in ("device", "host"):
        d = tmp_path / storage
        d.mkdir()
        transform = make_transform(LLAMA, settings(QuantizeEntry(**ENTRIES[1])), d, torch.bfloat16)
        engine.transform_sequentially(tiny_llama_dir, ids, LLAMA, transform, lambda it, **k: it, lambda i, m: None,
                                      storage=storage)
        found[storage] = {p.name: p.read_bytes() for p in sorted(d.iterdir())}
    assert placements == ["device", "host"] and len([n for n in found["host"] if n.endswith(".safetensors")]) == 3
    assert found["device"] == found["host"]


# bf16 storage: the error of the quantized model's logits against the float model, relative to
# the same error with float32 storage. Measured on the tiny model below: 0.996 (3 layers, width
# 64; 0.993 with 8 layers, width 256). Tolerance: within 5%. On the real SmolLM2 bf16 storage
# moved GPTQ's domain_valid perplexity by +0.43% (benchmarks/activation_storage.json,
# scripts/bench_activation_storage.py).
BF16_STORAGE_ERROR_TOLERANCE = 0.05


def test_bf16_storage_stays_within_its_tolerance_of_float32(tiny_llama_dir, tmp_path):
    from qlora_pipeline.layerwise.checkpoints import load_hf_model

    ids = _ids(tiny_llama_dir, 16, 128)
    entry = ENTRIES[0]
    shards = {dt: _quantize(tiny_llama_dir, ids, {**entry, "activations": {"dtype": dt}}, tmp_path / dt)
              for dt in ("float32", "bfloat16")}
    # The first layer reads the embeddings of a bf16 checkpoint: exact in bf16, the same layer.
    first = "model-00001-of-00004.safetensors"
    assert shards["float32"][first] == shards["bfloat16"][first]
    assert shards["float32"] != shards["bfloat16"]

    test_ids = _ids(tiny_llama_dir, 8, 128, seed=1)  # not the calibration windows
    with torch.no_grad():
        reference = load_hf_model(tiny_llama_dir, torch.float32, "cpu")(test_ids).logits
        err = {dt: float((METHODS["gptq"].loader()(tmp_path / dt / "out", torch.float32, "cpu")(test_ids).logits
                          - reference).norm()) for dt in shards}
    print(f"bf16/float32 storage, quantized logits' error: {err['bfloat16'] / err['float32']:.4f}")
    assert abs(err["bfloat16"] / err["float32"] - 1) < BF16_STORAGE_ERROR_TOLERANCE


def _recipe(model_dir, tmp_path, entries):
    r = tiny_recipe(model_dir, tmp_path, tracking={"enabled": False})
    r["quantize"] = entries
    return r


def test_cuda_requested_without_one_is_a_recipe_error(tiny_llama_dir, tmp_path, write_recipe, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(devices, "cuda_missing", lambda: "no NVIDIA GPU or driver is present")
    path = write_recipe(_recipe(tiny_llama_dir, tmp_path, [{"name": "g", "method": "gptq", "device": "cuda"}]))
    assert cli("run", str(path)) == 2
    err = capsys.readouterr().err
    assert ("quantize.0.device: cuda is requested but no NVIDIA GPU or driver is present; set quantize.0.device: "
            "auto (cuda when present) or cpu") in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_evaluate_on_cuda_without_one_is_a_recipe_error(tiny_llama_dir, tmp_path, write_recipe, monkeypatch, capsys):
    # It passed validate and failed the first evaluation stage, after data (exit 1).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(devices, "cuda_missing", lambda: "no NVIDIA GPU or driver is present")
    recipe = _recipe(tiny_llama_dir, tmp_path, [])
    recipe["evaluate"]["device"] = "cuda"
    assert cli("run", str(write_recipe(recipe))) == 2
    err = capsys.readouterr().err
    assert "evaluate.device: cuda is requested but no NVIDIA GPU or driver is present; set evaluate.device: auto" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
    # a GPU template still validates on a laptop, saying what the run will need
    assert cli("validate", str(write_recipe(recipe))) == 0
    assert "needs another machine: evaluate.device: cuda is requested" in capsys.readouterr().out


@pytest.mark.skipif(CUDA, reason="torch sees a GPU here")
def test_a_stage_fingerprinted_for_cuda_refuses_a_torch_without_it():
    from qlora_pipeline.errors import InputError

    with pytest.raises(InputError, match="quantize entry 'g' computes on cuda .* set its device: cpu"):
        devices.require_cuda("quantize entry 'g'", "its device")


def test_the_fingerprint_has_the_resolved_device_and_the_storage_dtype_not_the_placement(tiny_llama_dir, tmp_path,
                                                                                        monkeypatch):
    from qlora_pipeline.recipe import Recipe
    from qlora_pipeline.stages import build_stages

    def configs(entries, cuda_missing):
        monkeypatch.setattr(devices, "cuda_missing", lambda: cuda_missing)
        specs = build_stages(Recipe.model_validate(_recipe(tiny_llama_dir, tmp_path, entries)))
        return {s.name: s.config for s in specs if s.name.startswith(("quantize-", "awq-search"))}

    g = {"name": "g", "method": "gptq", "group_size": 32}
    base = configs([g], "no GPU")["quantize-g"]
    assert base["device"] == "cpu" and "device" not in base["entry"]
    assert base["entry"]["activations"] == {"dtype": "float32"}
    assert configs([{**g, "device": "cpu"}], None)["quantize-g"] == base            # auto and cpu agree here
    assert configs([g], None)["quantize-g"]["device"] == "cuda"                        # auto finds a GPU
    assert configs([{**g, "activations": {"storage": "host"}}], "no GPU")["quantize-g"] == base
    monkeypatch.setattr(devices, "cuda_missing", lambda: "no GPU")
    [spec] = [s for s in build_stages(Recipe.model_validate(_recipe(
        tiny_llama_dir, tmp_path, [{**g, "activations": {"storage": "host"}}]))) if s.name == "quantize-g"]
    assert spec.runtime == {"activations_storage": "host"}  # reaches the stage outside the fingerprint
    assert configs([{**g, "activations": {"dtype": "bfloat16"}}], "no GPU")["quantize-g"] != base
    assert "activations" not in configs([{"name": "r", "method": "rtn", "group_size": 32}], "no GPU")["quantize-r"]["entry"]
    awq = {"method": "awq+gptq", "group_size": 32}
    search = configs([{"name": "a", **awq}], None)["awq-search-w4g32"]
    assert search["device"] == "cuda" and search["activations_dtype"] == "float32"
    # Entries computing on other devices cannot share a search: one each.
    split = configs([{"name": "a", **awq}, {"name": "b", **awq, "device": "cpu"}], None)
    assert sorted(c["device"] for n, c in split.items() if n.startswith("awq-search")) == ["cpu", "cuda"]


def test_the_quantize_stage_takes_the_storage_from_its_runtime_settings(tiny_llama_dir, tmp_path, placements):
    from safetensors.torch import save_file

    from qlora_pipeline.graph import StageContext
    from qlora_pipeline.methods import relevant_settings
    from qlora_pipeline.stages import quantize
    from qlora_pipeline.stages.calibrate import CALIBRATION_FILE

    (tmp_path / "cal").mkdir()
    save_file({"input_ids": _ids(tiny_llama_dir, 4, 32)}, str(tmp_path / "cal" / CALIBRATION_FILE))

    class Quiet:
        def log_metrics(self, metrics, step=None):
            pass

    for storage in ("host", "device"):
        d = tmp_path / storage
        (d / "ck").mkdir(parents=True)
        (d / "out").mkdir()
        entry = QuantizeEntry(name="g", method="gptq", group_size=32, calibration_source="domain")  # as the registry resolves it
        quantize.run(StageContext("quantize-g", {"entry": relevant_settings(entry), "dtype": "bfloat16",
                                                 "device": "cpu"},
                                  {"merge": tiny_llama_dir, "calibrate": tmp_path / "cal"}, d / "out", d / "ck",
                                  Quiet(), lambda it, **k: it, tmp_path, runtime={"activations_storage": storage}))
    assert placements == ["host", "device"]


def test_cpu_storage_is_neither_pinned_nor_copied_when_resident():
    acts = engine.Activations((3, 4, 5), torch.float32, torch.device("cpu"), "host", chunk=2)
    assert not acts.data.is_pinned()  # pinning needs CUDA
    x = torch.randn(3, 4, 5)
    acts.write(0, x)
    chunks = list(acts.batches())
    assert [s for s, _ in chunks] == [0, 2] and chunks[0][1].data_ptr() != acts.data.data_ptr()  # streamed: a copy
    resident = engine.Activations((3, 4, 5), torch.float32, torch.device("cpu"), "device", chunk=2)
    resident.write(0, x)
    assert next(resident.batches())[1].data_ptr() == resident.data.data_ptr()  # the storage itself, as before


class _Allocations(TorchDispatchMode):
    """The largest tensor any op makes inside the block, in bytes."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


class _AffineLayer(torch.nn.Module):
    """A stand-in decoder layer: windows are independent, as in a real one."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, hidden)

    def forward(self, x, **_):
        return torch.tanh(self.proj(x)) + x


@pytest.mark.parametrize("placement", ["device", "host"])
def test_a_layer_forward_holds_one_activation_set_not_two(placement):
    """The engine writes each chunk's outputs over its inputs, so a layer's forward never makes
    a second [windows, tokens, hidden] set (the host-RAM and GPU plans count one: 8 GiB, not 16,
    at Llama-3-8B's 256 x 2048 calibration). An engine that gathered the outputs and swapped
    them in would fail here."""
    torch.manual_seed(0)
    layer = _AffineLayer(16)
    x = torch.randn(12, 10, 16)
    acts = engine.Activations(tuple(x.shape), torch.float32, torch.device("cpu"), placement, chunk=3)
    acts.write(0, x)
    storage = acts.data.data_ptr()
    with torch.no_grad(), _Allocations() as seen:
        engine._forward(layer, acts, None, None)
    with torch.no_grad():
        expected = layer(x)
    assert acts.data.data_ptr() == storage
    torch.testing.assert_close(acts.data, expected, rtol=0, atol=0)
    chunk_bytes = 3 * 10 * 16 * 4
    assert 0 < seen.largest <= chunk_bytes < x.numel() * 4


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_on_cuda_streamed_and_resident_give_the_same_bytes(tiny_llama_dir, tmp_path):
    ids = _ids(tiny_llama_dir)
    entry = ENTRIES[0]
    resident = _quantize(tiny_llama_dir, ids, {**entry, "activations": {"storage": "device"}}, tmp_path / "r", "cuda")
    streamed = _quantize(tiny_llama_dir, ids, {**entry, "activations": {"storage": "host"}}, tmp_path / "s", "cuda")
    assert resident == streamed
    acts = engine.Activations((2, 3, 4), torch.float32, torch.device("cuda"), "host", chunk=1)
    assert acts.data.is_pinned()


def test_first_inputs_are_the_float32_rows_of_the_stored_embedding(tiny_llama_dir):
    """The first layer's inputs: the stored (bf16) table's rows in float32, the values a float32
    copy of the whole table gives (the table is not copied: 2 GiB at Llama-3's vocabulary)."""
    from safetensors.torch import load_file

    from qlora_pipeline.layerwise.checkpoints import weight_map
    from qlora_pipeline.layerwise.families import family_for
    from qlora_pipeline.layerwise.runner import LayerwiseRunner

    config = read_config(tiny_llama_dir)
    family = family_for(config["model_type"])
    wmap = weight_map(tiny_llama_dir)
    stored = load_file(str(wmap[family.embed + ".weight"]))[family.embed + ".weight"]
    assert stored.dtype == torch.bfloat16
    ids = _ids(tiny_llama_dir)
    runner = LayerwiseRunner(config, torch.float32, family)
    hidden, _, _ = engine._first_inputs(runner, wmap, family, ids)
    assert hidden.data.dtype == torch.float32
    assert torch.equal(hidden.data, torch.nn.functional.embedding(ids, stored.float()))
    assert runner.base.embed_tokens.weight.device.type == "meta"  # the table is let go
