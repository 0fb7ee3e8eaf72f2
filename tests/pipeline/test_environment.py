"""Where the figures were computed: the processor and its bf16 path, threads, library versions;
said in the report and by `pipeline compare` when artifacts were evaluated in different places."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from qlora_pipeline.compare import DEFAULT_COLUMNS, PLACE, compare_runs
from qlora_pipeline.environment import compute_environment, cpu_description, describe
from qlora_pipeline.stages.report import environment_lines

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 {flags}

processor\t: 1
model name\t: a second core that must not be read
flags\t\t: fpu
"""


@pytest.mark.parametrize("flags, path", [("avx512f avx512_bf16 amx_bf16 amx_tile", "AMX"),
                                          ("avx512f avx512_bf16", "AVX-512 BF16"),
                                          ("avx512f", "no native bf16")])
def test_the_cpu_is_named_with_its_bf16_path(flags, path, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(flags=flags))
    assert cpu_description(cpuinfo) == f"Intel(R) Xeon(R) Platinum 8480+ ({path})"


def test_a_machine_without_cpuinfo_still_gets_a_name(tmp_path):
    name = cpu_description(tmp_path / "absent")
    assert name.endswith("(no native bf16)") and len(name) > len(" (no native bf16)")


def test_this_process_environment_and_its_line():
    env = compute_environment("cpu", torch.get_num_threads())
    assert env["torch"] == torch.__version__ and env["transformers"] == transformers.__version__
    assert env["threads"] == str(torch.get_num_threads()) and env["device"] == "cpu"
    assert compute_environment("cuda", 8, "NVIDIA H200")["processor"] == "NVIDIA H200"
    line = describe(env)
    assert line.startswith(f"cpu: {env['processor']}, {env['threads']} threads; torch ")
    assert f"transformers {env['transformers']}" in line


AMX = {"device": "cpu", "processor": "Xeon (AMX)", "threads": "2", "torch": "2.13.0", "transformers": "5.25.0"}
AVX = {**AMX, "processor": "EPYC (AVX-512 BF16)"}


def test_the_report_says_where_once_or_warns_when_places_differ():
    same = environment_lines({"base": {"environment": AMX}, "merged": {"environment": AMX}})
    assert same == ["Evaluations computed on cpu: Xeon (AMX), 2 threads; torch 2.13.0, transformers 5.25.0."]
    mixed = environment_lines({"base": {"environment": AMX}, "merged": {"environment": AVX},
                               "gptq": {"environment": AMX}, "old": {}})
    assert mixed[0].startswith("**Artifacts evaluated in different places**")
    assert "- cpu: Xeon (AMX), 2 threads; torch 2.13.0, transformers 5.25.0: base, gptq" in mixed
    assert "- cpu: EPYC (AVX-512 BF16), 2 threads; torch 2.13.0, transformers 5.25.0: merged" in mixed
    assert any(line.startswith("- not recorded") and line.endswith(": old") for line in mixed)


def _report(tmp_path, name, env):
    from tests.pipeline.test_bad_input import report_dir

    return report_dir(tmp_path, name, json.dumps({"artifacts": {"merged": {"domain_ppl": 10.0, "environment": env}}}))


def test_compare_shows_the_place_only_when_it_differs(tmp_path):
    a, b, c = _report(tmp_path, "a", AMX), _report(tmp_path, "b", AMX), _report(tmp_path, "c", AVX)
    rows, columns = compare_runs([a, b])
    assert PLACE not in columns
    rows, columns = compare_runs([a, c])
    assert PLACE in columns and [r[PLACE] for r in rows] == [describe(AMX), describe(AVX)]


def _with_stage(run, stage, config):
    """A finished stage's manifest in `run`, with its settings."""
    (run / stage).mkdir()
    (run / stage / "manifest.json").write_text(json.dumps({"fingerprint": "f", "files": {}, "config": config}))


def test_compare_shows_the_settings_each_artifact_differs_in(tmp_path):
    """Only train/merge/calibrate settings were columns: two GPTQ rows of different `desc_act`,
    or two base rows evaluated on different windows, stood side by side with nothing saying
    why their numbers differed (found by QA). Settings that tell two artifacts of one run apart
    (one is GPTQ, one round-to-nearest) are no column."""
    from tests.pipeline.test_bad_input import report_dir

    runs = []
    for name, desc_act, windows, gate in (("a", True, 8, 20.0), ("b", False, 8, 20.0), ("c", True, 6, 5.0)):
        artifacts = {n: {"domain_ppl": 10.0} for n in ("base", "gptq", "rtn")}
        run = report_dir(tmp_path, name, json.dumps({"artifacts": artifacts, "gate": {}}))
        _with_stage(run, "quantize-gptq", {"entry": {"method": "gptq", "group_size": 64, "desc_act": desc_act}})
        _with_stage(run, "quantize-rtn", {"entry": {"method": "rtn", "group_size": 64}})
        for artifact in artifacts:
            _with_stage(run, f"evaluate-{artifact}", {"evaluate": {"max_domain_windows": windows}})
        (run / "report" / "manifest.json").write_text(json.dumps(
            {**json.loads((run / "report" / "manifest.json").read_text()), "config": {"gate": {"max": gate}}}))
        runs.append(run)
    rows, columns = compare_runs(runs[:2])
    assert [c for c in columns if "." in c] == ["entry.desc_act"]
    assert [(r["run"], r["artifact"], r["entry.desc_act"]) for r in rows] == [
        ("a", "base", "–"), ("a", "gptq", "true"), ("a", "rtn", "–"),
        ("b", "base", "–"), ("b", "gptq", "false"), ("b", "rtn", "–")]
    rows, columns = compare_runs([runs[0], runs[2]])
    assert [c for c in columns if "." in c] == ["evaluate.max_domain_windows", "gate.max"]
    assert {(r["run"], r["evaluate.max_domain_windows"], r["gate.max"]) for r in rows} == {("a", "8", "20.0"),
                                                                                          ("c", "6", "5.0")}


def test_compare_tells_long_settings_apart_and_names_a_model_in_one_column(tmp_path):
    """Values were cut to 24 characters before they were compared, so target lists alike in
    their first characters got no column; two models' or corpora's files gave a column per
    file, each a cut sha256 (found in review)."""
    from tests.pipeline.test_bad_input import report_dir

    runs = []
    for name, targets, weights in (("a", ["q_proj", "k_proj", "v_proj", "o_proj"], {"model.safetensors": "1" * 64,
                                                                                   "config.json": "2" * 64}),
                                   ("b", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
                                    {"model.safetensors": "3" * 64, "config.json": "4" * 64})):
        run = report_dir(tmp_path, name, json.dumps({"artifacts": {"merged": {"domain_ppl": 10.0}}, "gate": {}}))
        _with_stage(run, "train", {"lora": {"target_modules": targets}})
        _with_stage(run, "data", {"weights": {"files": weights}, "calibration": {"source": "domain"}})
        _with_stage(run, "calibrate-general", {"calibration": {"source": "general"}})
        runs.append(run)
    rows, columns = compare_runs(runs)
    assert [c for c in columns if c not in DEFAULT_COLUMNS and c != PLACE] == ["lora.target_modules", "weights"]
    assert rows[0]["lora.target_modules"].endswith("…") and len(rows[0]["lora.target_modules"]) == 24
    assert rows[0]["weights"] != rows[1]["weights"]


def test_compare_reads_the_calibration_each_quantized_artifact_used(tmp_path):
    """Domain against general calibration windows, otherwise alike: one column, on the rows
    of the artifacts calibrated (not every calibration key twice, as two run-wide stages)."""
    from tests.pipeline.test_bad_input import report_dir

    runs = []
    for name, stage, source in (("a", "calibrate", "domain"), ("b", "calibrate-general", "general")):
        run = report_dir(tmp_path, name, json.dumps({"artifacts": {n: {"domain_ppl": 10.0} for n in ("merged", "gptq")},
                                                     "gate": {}}))
        _with_stage(run, stage, {"calibration": {"samples": 32, "source": source}})
        _with_stage(run, "quantize-gptq", {"entry": {"method": "gptq"}})
        manifest = run / "quantize-gptq" / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "inputs": {"merge": "m", stage: "c"}}))
        runs.append(run)
    rows, columns = compare_runs(runs)
    assert [c for c in columns if c not in DEFAULT_COLUMNS and c != PLACE] == ["calibration.source"]
    assert [(r["run"], r["artifact"], r["calibration.source"]) for r in rows] == [
        ("a", "merged", "–"), ("a", "gptq", '"domain"'), ("b", "merged", "–"), ("b", "gptq", '"general"')]
