"""The loader benchmark runs on a tiny generated folder and its shards and prints its Markdown table (no timing
asserted)."""
from __future__ import annotations

import re

from benchmarks import bench_dataset


def test_benchmark_prints_rates_per_worker_and_workers_needed(capsys):
    bench_dataset.main(["--pairs", "6", "--size", "64", "--generator-workers", "1", "--loader-workers", "0",
                        "--gpu-samples-per-s", "60", "--batch-size", "2", "--shard-size", "4"])
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == ["Fill50K layout, the image-folder layout and shards of the same 6 pairs of 64 px PNGs, "
                       "--resolution 64", "", "| what | rate |", "|---|---|"]
    rows = dict(re.fullmatch(r"\| (.+) \| (.+) \|", line).groups() for line in out[4:])
    assert list(rows) == ["generator, --workers 1", "decode only (2 PNGs), 1 worker", "MyDataset item, 1 worker",
                          "image folder (metadata.jsonl): MyDataset item, 1 worker",
                          "shards of 4: read tar members only, 1 worker", "shards of 4: ShardStream item, 1 worker",
                          "DataLoader, batch 2, num_workers 0", "workers for 60 samples/s (folder / shards)"]
    assert float(rows["decode only (2 PNGs), 1 worker"].removesuffix(" pairs/s")) > 0
    assert float(rows["shards of 4: ShardStream item, 1 worker"].removesuffix(" samples/s")) > 0
    assert float(rows["image folder (metadata.jsonl): MyDataset item, 1 worker"].removesuffix(" samples/s")) > 0
    per_worker = float(rows["MyDataset item, 1 worker"].removesuffix(" samples/s"))
    folder, shards = rows["workers for 60 samples/s (folder / shards)"].split(" / ")
    assert int(folder) >= 1 and int(shards) >= 1 and per_worker > 0


def test_bucket_histogram_of_the_mixed_size_folder(capsys):
    bench_dataset.main(["--bucket-histogram", "--resolution", "256"])
    line = capsys.readouterr().out.strip()
    prefix, histogram = line.split(": ", 1)
    assert prefix == f"{sum(bench_dataset.MIXED_SIZES.values())} items of 11 sizes, --resolution 256"
    counts = dict(entry.split(": ") for entry in histogram.split(", "))
    assert counts["256x256"] == "8"  # the 512x512 and 1000x1000 items
    assert sum(map(int, counts.values())) == sum(bench_dataset.MIXED_SIZES.values())
