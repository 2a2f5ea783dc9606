"""Wall time of the whole pipeline, stage by stage: one `dvc repro --force`, from download to report.

DVC's output (and the stages') passes through unchanged; the time at which DVC announces each stage is
noted, and a stage's seconds run until the next one is announced (the last one's until DVC exits), so
DVC's own work between stages is counted with the stage before it. Run it from the project's root with
nothing else on the machine: it retrains both models.

    python bench/repro_time.py [--json out.json] [-- more dvc repro args]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
import yaml

from pipeline.device import cpu_has_native_bf16
from pipeline.device import cpu_model

STAGE_STARTS = re.compile(r"Running stage '([^']+)'")


def stage_seconds(announced: list[tuple[str, float]], started: float, ended: float) -> dict[str, float]:
    """Seconds per stage from (stage, time announced); the time before the first stage goes to `dvc`."""
    marks = [("dvc", started), *announced, ("", ended)]
    seconds: dict[str, float] = {}
    for (name, start), (_, end) in zip(marks, marks[1:]):
        seconds[name] = seconds.get(name, 0.0) + end - start
    return seconds


def repro(dvc_args: list[str]) -> tuple[int, dict[str, float], float]:
    """Runs `dvc repro --force` with its output passed through; returns (exit code, seconds per stage, total)."""
    announced: list[tuple[str, float]] = []
    started = time.perf_counter()
    with subprocess.Popen(["dvc", "repro", "--force", *dvc_args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:
        pending = b""  # the unfinished last line, where a stage's announcement may still be arriving
        while chunk := proc.stdout.read1(1 << 16):
            sys.stdout.buffer.write(chunk)  # as it comes: progress bars redraw without a newline
            sys.stdout.flush()
            *lines, pending = (pending + chunk).split(b"\n")
            pending = pending[-4096:]  # a progress bar's redraws never end a line; an announcement is short
            for line in lines:
                if match := STAGE_STARTS.search(line.decode(errors="replace")):
                    announced.append((match.group(1), time.perf_counter()))
    ended = time.perf_counter()
    return proc.returncode, stage_seconds(announced, started, ended), ended - started


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("dvc_args", nargs="*", help="more arguments for dvc repro (after --)")
    args = parser.parse_args(argv)
    with open("params.yaml") as f:
        data_params = yaml.safe_load(f)["data"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    returncode, seconds, total = repro(args.dvc_args)
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or None,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "data_md5": data_params.get("md5"),
        "returncode": returncode,
        "stages_s": seconds,
        "total_s": total,
    }
    print(f"\ndvc repro --force: {total:.0f} s ({total / 60:.1f} min), exit code {returncode}")
    for name, s in seconds.items():
        print(f"  {name:16s} {s:8.1f} s")
    if args.json and returncode == 0:  # a failed run's times say nothing about the pipeline
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
