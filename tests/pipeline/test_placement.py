"""Where the layer engine keeps the calibration activations (pipeline.layerwise.placement),
decided with the sizes of real models and cards. No torch, no device: arithmetic only."""
from __future__ import annotations

import pytest

from qlora_pipeline.errors import InputError
from qlora_pipeline.layerwise.placement import GiB, plan, reserve, workload_for

# config.json of meta-llama/Meta-Llama-3-8B and HuggingFaceTB/SmolLM2-135M (the sizes that count)
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128}
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}
LLAMA3_CALIBRATION = (256, 2048)   # recipes/llama3_domain.yaml calibration.samples, seq_len
SMOLLM2_CALIBRATION = (32, 512)    # recipes/smollm2_domain.yaml
# what torch.cuda.mem_get_info reports free on an idle card, after the CUDA context
FREE_24GB, FREE_16GB, FREE_12GB, FREE_80GB, FREE_8GB = 23.5 * GiB, 15.5 * GiB, 11.5 * GiB, 79.2 * GiB, 7.5 * GiB
HOST = 64 * GiB


def gptq_8b(storage_bytes: int):
    return workload_for(LLAMA3_8B, *LLAMA3_CALIBRATION, storage_bytes)


def test_the_8b_figures_of_the_readme():
    w = gptq_8b(4)
    assert w.activations == 256 * 2048 * 4096 * 4 == 8 * GiB
    assert gptq_8b(2).activations == 4 * GiB
    assert round(w.layer_bytes / GiB, 2) == 0.81
    assert w.hessians == 4 * 14336**2 * 4 and round(w.hessians / GiB, 1) == 3.1
    assert round((w.activations + w.layer_work) / GiB, 1) == 16.9
    assert round((gptq_8b(2).activations + w.layer_work) / GiB, 1) == 12.9
    # an engine keeping a layer's inputs and outputs apart needs a second set: no room on 24 GB
    assert round((2 * w.activations + w.layer_work) / GiB, 1) == 24.9
    assert 2 * w.activations + w.layer_work > FREE_24GB - reserve(FREE_24GB)


@pytest.mark.parametrize("storage_bytes", [4, 2])
def test_8b_on_a_24gb_card_is_resident(storage_bytes):
    p = plan(gptq_8b(storage_bytes), FREE_24GB, HOST)
    assert p.placement == "device"
    assert round(p.usable / GiB, 1) == 21.3


def test_8b_awq_on_a_24gb_card_is_resident_just():
    w = workload_for(LLAMA3_8B, *LLAMA3_CALIBRATION, 4, hessians=4, solve=False, awq_search_windows=8)
    p = plan(w, FREE_24GB, HOST)
    assert p.placement == "device" and p.usable - p.need_resident < 0.5 * GiB


@pytest.mark.parametrize("storage_bytes,card,placement", [(4, FREE_16GB, "host"), (2, FREE_16GB, "device"),
                                                          (4, FREE_12GB, "host"), (2, FREE_12GB, "host")])
def test_8b_on_16gb_and_12gb_cards(storage_bytes, card, placement):
    """16 GB: bfloat16 storage is resident (12.9 GiB), float32 streams; 12 GB: both stream."""
    p = plan(gptq_8b(storage_bytes), card, HOST)
    assert p.placement == placement
    if placement == "host":
        assert p.need_streaming <= p.usable < p.need_resident
    else:
        assert p.need_resident <= p.usable


def test_8b_on_an_80gb_card_is_resident_even_in_one_pass():
    w = workload_for(LLAMA3_8B, *LLAMA3_CALIBRATION, 4, hessians=4)
    assert plan(w, FREE_80GB, HOST).placement == "device"


def test_smollm2_on_a_24gb_card_is_resident():
    w = workload_for(SMOLLM2, *SMOLLM2_CALIBRATION, 4)
    assert w.activations == 32 * 512 * 576 * 4
    assert plan(w, FREE_24GB, HOST).placement == "device"


def test_8b_on_an_8gb_card_fits_nowhere_and_says_what_to_change():
    with pytest.raises(InputError) as err:
        plan(gptq_8b(4), FREE_8GB, HOST, where="quantize entry 'gptq'")
    msg = str(err.value)
    assert msg.startswith("quantize entry 'gptq': the calibration activations fit neither")
    assert "9.1 GiB on the device" in msg
    assert "calibration.samples" in msg and "activations.dtype: bfloat16" in msg and "device: cpu" in msg


def test_too_little_host_memory_to_stream_is_an_error_too():
    with pytest.raises(InputError, match="host memory has 6.0 GiB available for the 8.0 GiB"):
        plan(gptq_8b(4), FREE_16GB, 6 * GiB)
    with pytest.raises(InputError, match="host memory has 6.0 GiB available for the 8.0 GiB"):
        plan(gptq_8b(4), FREE_12GB, 6 * GiB)
    # bf16 halves what the host must hold: it streams
    assert plan(gptq_8b(2), FREE_12GB, 6 * GiB).placement == "host"


def test_a_forced_storage_is_honoured_without_the_estimate():
    assert plan(gptq_8b(4), FREE_8GB, HOST, storage="host").placement == "host"
    assert plan(gptq_8b(4), FREE_16GB, HOST, storage="device").placement == "device"
    assert plan(workload_for(SMOLLM2, *SMOLLM2_CALIBRATION, 4), FREE_24GB, HOST, storage="host").placement == "host"


def test_the_plan_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; import qlora_pipeline.layerwise.placement, qlora_pipeline.devices; "
            "assert 'torch' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
