"""The training-loop benchmark runs Lightning's loop on the tiny config and prints its rows (no timing asserted)."""
from __future__ import annotations

import re

from benchmarks import bench_train_loop


def test_loop_benchmark_prints_seconds_per_iteration_and_samples_per_second(capsys, repo_root):
    assert bench_train_loop.main(["--config", str(repo_root / "models" / "cldm_tiny.yaml"), "--resolution", "64",
                                  "--batch_size", "2", "--accelerator", "cpu", "--steps", "2", "--warmup", "1"]) == 0
    rows = dict(re.findall(r"^(.+?)\s{2,}(.+)$", capsys.readouterr().out, re.MULTILINE))
    assert rows["batch per device / global"] == "2 / 2" and rows["timed steps"] == "2"
    assert float(rows["s/it (median)"]) > 0 and float(rows["samples/s"]) > 0
