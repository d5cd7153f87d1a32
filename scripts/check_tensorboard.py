#!/usr/bin/env python3
"""Reads a titan run's TensorBoard events with TensorBoard's own EventAccumulator and checks
every scalar against the run's metrics.jsonl (same step, value equal as float32).

    pip install tensorboard
    titan train --config configs/llama3_debugmodel.toml --metrics.enable_tensorboard \
        --metrics.log_freq 1 --validation.enable --job.dump_folder /tmp/run
    python scripts/check_tensorboard.py /tmp/run          # [--tb-folder tb]

Exit status 0 when every metrics.jsonl scalar is in the events with its step and value, 1 when
anything is missing or differs. The Rust test tests/tensorboard.rs checks the same with its own
decoder (CI has no tensorboard package).
"""

import argparse
import glob
import json
import os
import struct
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# metrics.jsonl key -> TensorBoard tag
STEP_TAGS = {
    "loss": "loss_metrics/global_avg_loss",
    "grad_norm": "grad_norm",
    "lr": "lr",
    "tokens_per_s": "throughput(tps)",
    "tflops": "tflops",
    "mfu_pct": "mfu(%)",
    "step_time_s": "time_metrics/end_to_end(s)",
    "memory_actual_gib": "memory/max_reserved(GiB)",
    "memory_planned_gib": "memory/planned(GiB)",
    "eta_s": "time_metrics/eta(s)",
}
VALIDATION_TAGS = {
    "validation_loss": "validation_metrics/loss",
    "validation_time_s": "validation_metrics/time(s)",
}


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dump_folder")
    ap.add_argument("--tb-folder", default="tb", help="metrics.save_tb_folder (default tb)")
    a = ap.parse_args()

    files = sorted(glob.glob(os.path.join(a.dump_folder, a.tb_folder, "**", "events.out.tfevents.*"),
                             recursive=True))
    if not files:
        sys.exit(f"no event files under {os.path.join(a.dump_folder, a.tb_folder)}")
    # Every run folder (one per start of training; resumes add folders) holds one file here.
    scalars = {}  # tag -> {step: value}
    for f in files:
        acc = EventAccumulator(os.path.dirname(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for ev in acc.Scalars(tag):
                scalars.setdefault(tag, {})[ev.step] = ev.value
        print(f"{f}: {len(acc.Tags()['scalars'])} scalar tags")

    bad = checked = 0
    with open(os.path.join(a.dump_folder, "metrics.jsonl")) as fh:
        for line in fh:
            rec = json.loads(line)
            table = STEP_TAGS if "loss" in rec else VALIDATION_TAGS
            for key, tag in table.items():
                checked += 1
                got = scalars.get(tag, {}).get(rec["step"])
                if got is None or got != f32(rec[key]):
                    bad += 1
                    print(f"MISMATCH step {rec['step']} {tag}: events {got}, metrics.jsonl {rec[key]}")
    for tag in sorted(scalars):
        steps = sorted(scalars[tag])
        print(f"  {tag:32s} {len(steps):4d} points, steps {steps[0]}..{steps[-1]}, "
              f"last {scalars[tag][steps[-1]]:.6g}")
    print(f"{checked} scalars of metrics.jsonl checked, {bad} mismatches")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
