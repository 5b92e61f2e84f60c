"""The GPU check's plan and arithmetic, without a GPU (the check itself needs one)."""
from __future__ import annotations

import csv

import pytest

from benchmarks import gpu_check


def test_batch_four_compares_both_sides_and_the_sweep_runs_each_sides_fastest_setting():
    at_four, sweep = gpu_check.step_jobs([16, 32], steps=6, warmup=3)
    assert [(title, job.label) for title, job in at_four] == [
        ("diffusers step", "diffusers, ckpt off"),
        ("ours step (tutorial_train defaults)", "ours, ckpt off, frozen bf16"),
        ("ours, frozen weights in fp32", "ours, ckpt off"),
        ("ours, weight casts recomputed", "ours, ckpt off, frozen bf16, weight casts recomputed"),
        ("ours, lean (AdamW in backward)", "ours, ckpt off, frozen bf16, AdamW in backward"),
        ("ours, lean + latent cache", "ours, ckpt off, frozen bf16, AdamW in backward, latent cache"),
        ("diffusers step", "diffusers, ckpt on"),
        ("ours step (tutorial_train defaults)", "ours, ckpt on, frozen bf16"),
    ]
    jobs = [job for _, job in at_four]
    assert all(job.batch == 4 and job.resolution == 512 and job.precision == "bf16-mixed" for job in jobs)
    assert [job.profile for job in jobs] == [True] * 6 + [False] * 2  # a profiled step per row without ckpt
    assert [(job.side, job.batch, job.latent_cache, job.checkpointing) for job in sweep] == [
        ("diffusers", 16, False, False), ("ours", 16, True, False),
        ("diffusers", 32, False, False), ("ours", 32, True, False),
    ]
    assert not any(job.count or job.profile for job in sweep)  # the sweep only times


def test_the_best_batch_is_the_highest_throughput_among_the_rows_that_ran():
    _, sweep = gpu_check.step_jobs([16, 32, 64], steps=4, warmup=2)
    seconds = {16: 0.5, 32: 0.8, 64: 2.0}  # samples/s: 32, 40, 32
    results = {job: {"times": [seconds[job.batch]]} for job in sweep}
    results[sweep[-1]] = {"error": "torch.OutOfMemoryError"}  # ours at 64
    best = gpu_check.best_by_side(sweep, results)
    assert (best["diffusers"].batch, best["ours"].batch) == (32, 32)


def test_steady_throughput_is_the_median_step_of_the_second_half(tmp_path):
    metrics = tmp_path / "metrics.csv"
    seconds = [5.0] + [0.5] * 6 + [4.0] + [0.5] * 4  # warm-up, then 0.5 s per batch of 4, one epoch restart
    with metrics.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "train/time", "train/samples", "train/loss"])
        writer.writerow([0, "", "", 1.0])  # other metrics' rows have no throughput
        for step, elapsed in enumerate(seconds):
            writer.writerow([step, sum(seconds[:step + 1]), 4 * (step + 1), ""])
    assert gpu_check.steady_samples_per_second(metrics) == pytest.approx(8.0)
    metrics.write_text("step,train/time,train/samples\n0,1.0,4\n")
    with pytest.raises(RuntimeError, match="fewer than 4 steps"):
        gpu_check.steady_samples_per_second(metrics)


def test_profiled_steps_are_written_beside_the_logs_with_a_summary_line(tmp_path):
    at_four, _ = gpu_check.step_jobs([16], steps=6, warmup=3)
    jobs = [job for _, job in at_four]
    profile = {"wall_seconds": 0.5, "device_seconds": 0.1, "kernels": 5000, "table": "op table"}
    results = {job: {"times": [0.2], "profile": profile} if job.profile else {"times": [0.3]} for job in jobs}
    lines = gpu_check.write_profiles(jobs, results, tmp_path)
    assert len(lines) == 6 and "0.500 s wall, GPU busy 0.100 s, 5000 kernels" in lines[0]
    assert (tmp_path / "profile_diffusers__ckpt_off.txt").read_text() == "op table"
