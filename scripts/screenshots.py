"""Screenshots of the views docs/views.md shows: MLflow's UI on the committed run, and `make plots`' page.

Serves the project's MLflow store (sqlite:///mlflow.db) on 127.0.0.1 and photographs, in a headless
Chromium, the pages a user opens first: the experiment's runs, the ResNet run's charts, the parent run's
headline, Compare runs of the two models, and DVC's plots (run `make plots` first). The runs are the
ones models/<name>/mlflow.json name, i.e. the run dvc.lock records.

Needs Playwright and a Chromium, which the project itself does not:
    pip install playwright  # then `playwright install chromium`, or pass --chromium /usr/bin/chromium
    python scripts/screenshots.py [--chromium PATH] [--out docs/images]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
SETTLE_S = 12  # MLflow's pages fetch and draw their charts after the page has loaded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_store(port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{ROOT / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # its workers: one group
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(1)
    stop(server)
    raise SystemExit("the MLflow server did not answer within 2 minutes")


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def expand_rows(page: Page) -> None:
    button = page.get_by_role("button", name="Expand rows")
    if button.count():
        button.first.click()


def shoot(page: Page, url: str, path: Path, before=None) -> None:
    page.goto(url)
    time.sleep(SETTLE_S)
    close = page.get_by_role("button", name="Close")  # MLflow's assistant panel: not this project's
    if close.count():
        close.first.click()
    if before is not None:
        before(page)
        time.sleep(2)
    page.screenshot(path=str(path))
    print(f"wrote {path.relative_to(ROOT)}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", help="a Chromium executable (default: Playwright's own)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = {name: json.loads((ROOT / "models" / name / "mlflow.json").read_text())["run_id"]
            for name in ("baseline", "resnet")}

    port = free_port()
    server = serve_store(port)
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{port}")
        resnet = client.get_run(runs["resnet"])
        experiment, parent = resnet.info.experiment_id, resnet.data.tags.get("mlflow.parentRunId")
        base = f"http://127.0.0.1:{port}/#"
        ml = "workflowType=machine_learning"  # the UI's model-training pages, not its GenAI ones
        ids = "%5B" + ",".join(f"%22{run}%22" for run in runs.values()) + "%5D"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            shoot(page, f"{base}/experiments/{experiment}/runs?{ml}", out / "mlflow-runs.png",
                  before=expand_rows)
            shoot(page, f"{base}/experiments/{experiment}/runs/{runs['resnet']}/model-metrics?{ml}",
                  out / "mlflow-run-charts.png")
            page.set_viewport_size({"width": 1440, "height": 1300})
            if parent:  # a run of `mlflow run . -e train` has none
                shoot(page, f"{base}/experiments/{experiment}/runs/{parent}?{ml}", out / "mlflow-parent-run.png")
            shoot(page, f"{base}/compare-runs?runs={ids}&experiments=%5B%22{experiment}%22%5D&{ml}",
                  out / "mlflow-compare-runs.png")
            plots = ROOT / "dvc_plots" / "index.html"
            if plots.exists():
                page.set_viewport_size({"width": 1440, "height": 1000})
                shoot(page, plots.as_uri(), out / "dvc-plots.png")
            else:
                print("dvc_plots/index.html not found: run `make plots` first for its screenshot")
            browser.close()
    finally:
        stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
