"""The loader benchmark runs on a tiny generated folder and prints its Markdown table (no timing asserted)."""
from __future__ import annotations

import re

from benchmarks import bench_dataset


def test_benchmark_prints_rates_per_worker_and_workers_needed(capsys):
    bench_dataset.main(["--pairs", "6", "--size", "64", "--generator-workers", "1", "--loader-workers", "0",
                        "--gpu-samples-per-s", "60"])
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == ["Fill50K layout, 6 pairs of 64 px PNGs, --resolution 64", "", "| what | rate |", "|---|---|"]
    rows = dict(re.fullmatch(r"\| (.+) \| (.+) \|", line).groups() for line in out[4:])
    assert list(rows) == ["generator, --workers 1", "decode only (2 PNGs), 1 worker", "MyDataset item, 1 worker",
                          "DataLoader, batch 4, num_workers 0", "workers for 60 samples/s"]
    assert float(rows["decode only (2 PNGs), 1 worker"].removesuffix(" pairs/s")) > 0
    per_worker = float(rows["MyDataset item, 1 worker"].removesuffix(" samples/s"))
    assert int(rows["workers for 60 samples/s"]) >= 1 and per_worker > 0
