"""Check what `pipeline ui` shows a new user, in a real browser (headless Chromium).

Starts `pipeline ui` on a finished run's tracking store (127.0.0.1, a free port), loads the
runs page it prints, and checks that the page is the experiment's runs table (not the GenAI
overview) in the model-training layout, that the parent run is listed under its name and that the report's metric columns
(`<artifact>.domain_ppl`, ...) are on the page; then stops the server. With --screenshot it
also writes a picture of the page.

    .venv/bin/python scripts/check_ui.py                        # makes a tiny finished run first (~1 min)
    .venv/bin/python scripts/check_ui.py --recipe R.yaml        # a recipe whose run has finished
    .venv/bin/python scripts/check_ui.py --screenshot docs/mlflow_runs.png

Needs `chromium` (apt-get install -y chromium). Exit code 0: every check passed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=15000", "--window-size=1600,900"]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


RUNS_TABLE = 'col-id="attributes.`Run Name`"'  # the runs table's grid in the DOM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(args: list[str], timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start `pipeline ui ARGS` and return (its process, the runs URL it printed)."""
    cmd = [sys.executable, "-m", "qlora_pipeline.cli", "ui", "--host", "127.0.0.1", "--port", str(free_port()), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    deadline = time.time() + timeout
    for line in proc.stdout:  # the server's own log lines come through too
        match = re.match(r"runs: (\S+)", line)
        if match:  # keep reading what the server logs, or it blocks on a full pipe
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, match.group(1)
        if time.time() > deadline:
            break
    stop_ui(proc)
    raise RuntimeError(f"`{' '.join(cmd)}` printed no runs URL (exit code {proc.poll()})")


def stop_ui(proc: subprocess.Popen) -> None:
    """SIGTERM: `pipeline ui` stops its server's process group and exits."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.stdout:
        proc.stdout.close()


def browse(url: str, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran (and a screenshot of it when asked)."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120).stdout
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={screenshot.resolve()}",
                            url], capture_output=True, timeout=120, check=True)
    return dom


def page_problems(dom: str, run_name: str, metrics: list[str]) -> list[str]:
    """What is wrong with the runs page: the parent run's name and the metric columns must be there."""
    import html

    text = html.unescape(dom)
    problems = []
    if RUNS_TABLE not in text or "<title>Runs - Experiment" not in text:
        problems.append("the page is not the experiment's runs table (title, Run Name column)")
    if "Model registry" not in text:  # in the side bar of the model-training layout only
        problems.append("the page is not in MLflow's model-training layout (no 'Model registry' in the side bar)")
    if run_name not in text:
        problems.append(f"the parent run '{run_name}' is not on the page")
    missing = [m for m in metrics if f"metrics.`{m}`" not in text]
    if missing:
        problems.append(f"metric columns missing: {', '.join(missing)}")
    return problems


def parent_run(recipe: Path) -> tuple[str, list[str]]:
    """(name, `<artifact>.domain_ppl` metrics) of the parent run of `recipe`'s finished run."""
    from mlflow.tracking import MlflowClient

    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.tracking import default_tracking_uri

    cfg, _ = load_recipe(recipe)
    run_dir = Path(cfg.run.dir) / cfg.run.name
    info = json.loads((run_dir / "run.json").read_text())
    run = MlflowClient(cfg.tracking.uri or default_tracking_uri()).get_run(info["mlflow_parent_run_id"])
    return run.info.run_name, sorted(k for k in run.data.metrics if k.endswith(".domain_ppl"))


def tiny_run(workdir: Path) -> Path:
    """A finished run of a tiny random Llama (SmolLM2's tokenizer), tracked in workdir/mlflow.db."""
    sys.path.insert(0, str(REPO / "tests"))
    import yaml
    from conftest import make_tiny_llama, tiny_recipe

    from qlora_pipeline.models import resolve_model
    from qlora_pipeline.recipe import ModelConfig

    model = workdir / "tiny-llama"
    if not (model / "config.json").is_file():
        make_tiny_llama(model, resolve_model(ModelConfig(source="builtin:smollm2-135m")))
    recipe = tiny_recipe(model, workdir, evaluate={"speed": False, "prompts": []})
    recipe["quantize"] = [{"name": "rtn-w4g32", "method": "rtn", "bits": 4, "group_size": 32}]
    path = workdir / "tiny_ui.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    subprocess.run([sys.executable, "-m", "qlora_pipeline.cli", "run", str(path)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    return path


def check(recipe: Path, screenshot: Path | None = None) -> list[str]:
    name, metrics = parent_run(recipe)
    if not metrics:
        return [f"the parent run '{name}' has no <artifact>.domain_ppl metrics: has its report stage run?"]
    proc, url = start_ui(["--recipe", str(recipe)])
    try:
        print(f"runs page: {url}", flush=True)
        problems = page_problems(browse(url, screenshot), name, metrics)
    finally:
        stop_ui(proc)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, help="a recipe whose run has finished (default: make a tiny run)")
    parser.add_argument("--workdir", type=Path, help="where the tiny run goes (default: a temporary folder)")
    parser.add_argument("--screenshot", type=Path, help="also write a PNG of the page here")
    args = parser.parse_args()
    if chromium() is None:
        print("chromium is not installed (apt-get install -y chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        recipe = args.recipe
        if recipe is None:
            workdir = args.workdir or Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            recipe = tiny_run(workdir)
        problems = check(recipe, args.screenshot)
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if not problems:
        print("ok: runs table, parent run and its report metrics are on the page"
              + (f"; screenshot: {args.screenshot}" if args.screenshot else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
