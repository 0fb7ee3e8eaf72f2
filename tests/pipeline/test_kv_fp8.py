"""fp8 KV-cache perplexity: the rounding, the cache against a hand-written Llama forward whose
attention reads rounded K/V at every position, the calibrated scales, and the evaluation stage."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from qlora_pipeline.kv_fp8 import FP8_MAX, Fp8KVCache, calibrated_scales, round_fp8
from qlora_pipeline.scoring import cache_argument


def _fp8_values() -> torch.Tensor:
    """Every finite float8_e4m3fn value, from its 256 bit patterns."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    return values[torch.isfinite(values)].unique()


def test_rounding_picks_a_nearest_fp8_value_and_saturates():
    table = _fp8_values()
    assert table.max() == FP8_MAX == 448
    x = torch.cat([torch.randn(4000) * 10, torch.randn(1000) * 0.01, torch.tensor([500.0, -1e4, 448.0, 0.0])])
    for scale in (1.0, 0.37, 3e-3):
        r = round_fp8(x, scale)
        scaled = (x / scale).clamp(-448, 448)
        nearest = (scaled[:, None] - table[None, :]).abs().min(dim=1).values
        assert torch.all((r / scale - scaled).abs() <= nearest + 1e-6 * scaled.abs() + 1e-12)
    assert round_fp8(torch.tensor([1e4, -1e4]), 1.0).tolist() == [448.0, -448.0]  # saturates, no NaN
    assert round_fp8(torch.tensor([1.0, 1.0625, 1.1875]), 1.0).tolist() == [1.0, 1.0, 1.25]  # ties to even


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(t):
    half = t.shape[-1] // 2
    return torch.cat([-t[..., half:], t[..., :half]], dim=-1)


@torch.no_grad()
def manual_logits(model, ids: torch.Tensor, scales=None, amax=None) -> torch.Tensor:
    """A Llama forward written out (fp32): causal attention over K (after RoPE) and V, both
    rounded through fp8 with scales[layer] = (k_scale, v_scale) for every position when given;
    `amax`, if given, collects per layer max |K|, max |V|."""
    cfg, m = model.config, model.model
    B, L = ids.shape
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    theta = cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    freqs = torch.outer(torch.arange(L).float(), inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    x = m.embed_tokens.weight[ids]
    for i, layer in enumerate(m.layers):
        a = layer.self_attn
        h = _rms(x, layer.input_layernorm.weight, cfg.rms_norm_eps)
        q = F.linear(h, a.q_proj.weight).view(B, L, H, D).transpose(1, 2)
        k = F.linear(h, a.k_proj.weight).view(B, L, KV, D).transpose(1, 2)
        v = F.linear(h, a.v_proj.weight).view(B, L, KV, D).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if amax is not None:
            amax[i] = [max(amax[i][0], k.abs().max().item()), max(amax[i][1], v.abs().max().item())]
        if scales is not None:
            ks, vs = scales[i]
            k = (k / ks).clamp(-448, 448).to(torch.float8_e4m3fn).float() * ks
            v = (v / vs).clamp(-448, 448).to(torch.float8_e4m3fn).float() * vs
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(D)).masked_fill(causal, float("-inf")).softmax(-1)
        x = x + F.linear((att @ v).transpose(1, 2).reshape(B, L, H * D), a.o_proj.weight)
        h = _rms(x, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        mlp = layer.mlp
        x = x + F.linear(F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight), mlp.down_proj.weight)
    return F.linear(_rms(x, m.norm.weight, cfg.rms_norm_eps), model.lm_head.weight)


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    from qlora_pipeline.layerwise.checkpoints import load_hf_model

    return load_hf_model(tiny_llama_dir, torch.float32, "cpu")


def test_every_position_attends_to_rounded_keys_and_values(tiny_model):
    ids = torch.randint(0, 5000, (2, 48))
    with torch.no_grad():
        plain = tiny_model(input_ids=ids).logits
    torch.testing.assert_close(manual_logits(tiny_model, ids), plain, rtol=1e-4, atol=1e-4)  # the hand-written forward
    for scales in ([(1.0, 1.0)] * 3, [(0.004, 0.002), (0.01, 0.003), (0.002, 0.02)]):
        with torch.no_grad():
            ours = tiny_model(input_ids=ids, **{cache_argument(tiny_model): Fp8KVCache(scales), "use_cache": True}).logits
        expected = manual_logits(tiny_model, ids, scales)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
        assert (expected - plain).abs().max() > 100 * 1e-4  # the rounding shows, well above the tolerance


def test_calibrated_scales_are_amax_over_448_of_keys_after_rope(tiny_model):
    windows = torch.randint(0, 5000, (3, 40))
    amax = [[0.0, 0.0] for _ in range(3)]
    manual_logits(tiny_model, windows, amax=amax)
    scales = calibrated_scales(tiny_model, windows, batch_size=2, device="cpu")
    assert len(scales) == 3
    for (k, v), (ka, va) in zip(scales, amax):
        assert k == pytest.approx(ka / 448, rel=1e-5) and v == pytest.approx(va / 448, rel=1e-5)


def test_evaluation_reports_fp8_kv_perplexities_calibrated_on_the_train_split(tiny_model, tiny_llama_dir, tmp_path):
    """The evaluation stage, with `evaluate.kv_fp8`, against the hand-written forward: scales from
    the first domain_train windows, perplexity on domain_eval."""
    from qlora_pipeline.graph import StageContext
    from qlora_pipeline.stages.evaluate import make_stage

    seq_len = 32
    streams = {"domain_eval": torch.randint(0, 5000, (3 * seq_len + 5,)),
               "domain_train": torch.randint(0, 5000, (4 * seq_len,)),
               "domain_valid": torch.randint(0, 5000, (seq_len,))}
    (tmp_path / "data").mkdir()
    save_file(streams, str(tmp_path / "data" / "tokens.safetensors"))

    class NoMetrics:
        def log_metrics(self, *a, **k): ...
        def log_artifact(self, *a, **k): ...
        def set_tags(self, *a, **k): ...

    ctx = StageContext(name="evaluate-tiny", inputs={"data": tmp_path / "data"}, output_dir=tmp_path / "out",
                       checkpoint_dir=tmp_path / "ckpt", metrics=NoMetrics(), progress=lambda it, **kw: it,
                       run_dir=tmp_path, config={"evaluate": {"seq_len": seq_len, "batch_size": 2, "speed": False,
                                                               "kv_fp8": True, "kv_fp8_calibration_windows": 2}})
    ctx.output_dir.mkdir()
    make_stage("tiny", lambda c, dtype, device: (tiny_model, tiny_llama_dir))(ctx)
    m = json.loads((ctx.output_dir / "metrics.json").read_text())

    amax = [[0.0, 0.0] for _ in range(3)]
    manual_logits(tiny_model, streams["domain_train"][: 2 * seq_len].view(2, seq_len), amax=amax)
    scales = [(k / 448, v / 448) for k, v in amax]
    assert sum(m["kv_fp8_scales"], []) == pytest.approx(sum(map(list, scales), []), rel=1e-5)
    windows = streams["domain_eval"][: 3 * seq_len].view(3, seq_len)

    def ppl(logits):
        return math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item())

    assert m["domain_ppl"] == pytest.approx(ppl(manual_logits(tiny_model, windows)), rel=1e-5)
    assert m["kv_fp8_domain_ppl"] == pytest.approx(ppl(manual_logits(tiny_model, windows, [(1.0, 1.0)] * 3)), rel=1e-5)
    assert m["kv_fp8_calibrated_domain_ppl"] == pytest.approx(ppl(manual_logits(tiny_model, windows, scales)), rel=1e-5)
    assert m["kv_shape"] == {"layers": 3, "kv_heads": 2, "head_dim": 16}
    assert m["weights_bytes"] > 0
