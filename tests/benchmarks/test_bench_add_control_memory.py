"""The checkpoint-tools memory benchmark runs end to end on the tiny config and prints its table."""
from __future__ import annotations

from benchmarks import bench_add_control_memory
from tests.helpers.paths import TINY_CONFIG


def test_benchmark_runs_tiny(tmp_path, capsys) -> None:
    bench_add_control_memory.main(["--config", str(TINY_CONFIG), "--folder", str(tmp_path)])
    header, _, *rows = capsys.readouterr().out.splitlines()
    assert header.startswith("| config | tool and inputs | inputs | output | peak RSS |")
    # The memory goal is the benchmark's to report, not a test's to assert: at the tiny size the libraries alone
    # (about 1.2 GB) exceed "output + 1 GB", so only the rows' form is checked here.
    tools = ["tool_add_control.py .ckpt", "tool_add_control.py .safetensors",
             "tool_transfer_control.py .ckpt, .ckpt, .safetensors"]
    assert [row.split(" | ")[1] for row in rows] == tools
    assert all(row.startswith(f"| {TINY_CONFIG} |") and ("| yes |" in row or "| NO |" in row) for row in rows)
    assert list(tmp_path.iterdir()) == []
