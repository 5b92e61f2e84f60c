"""The training-step benchmark runs end to end at the tiny size and compares like with like (no timing asserted)."""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from benchmarks import bench_train_step
from benchmarks.bench_train_step import TINY_CONFIG, VARIANT_OPTIONS, Job, build_parser, diffusers_configs, plan
from tests.helpers.paths import REPO_ROOT


@pytest.mark.slow
def test_benchmark_prints_the_table_for_both_sides_of_the_same_architecture():
    command = [sys.executable, "-m", "benchmarks.bench_train_step", "--tiny", "--resolution", "64", "--steps", "1",
               "--warmup", "0", "--rounds", "1", "--checkpointing", "off"]
    process = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert process.returncode == 0, process.stderr[-3000:]
    out = process.stdout
    assert "res/latent" in out and "GFLOP/sample" in out and "ops/step" in out
    rows = {match[1].strip(): match[2] for match in re.finditer(r"^64px/8 b1\s+\| ([^|]+)\|(.*)$", out, re.MULTILINE)}
    assert set(rows) == {"ours, ckpt off", "diffusers, ckpt off"}
    # Same architecture: identical parameter counts and identical FLOPs per step.
    sizes = re.findall(r"^\s+(ours|diffusers)\s+params \(M\): (.*)$", out, re.MULTILINE)
    assert len(sizes) == 2 and sizes[0][1] == sizes[1][1]
    gflops = {label: cells.split("|")[5].strip() for label, cells in rows.items()}
    assert gflops["ours, ckpt off"] == gflops["diffusers, ckpt off"] != "-"
    for cells in rows.values():  # operators, Python calls and hook calls per step were counted
        assert all(re.fullmatch(r"\d+\.\dk", cell.strip()) for cell in cells.split("|")[7:10])


def test_diffusers_configs_follow_our_yaml(repo_root):
    configs = diffusers_configs(repo_root / TINY_CONFIG)
    assert configs["unet"]["block_out_channels"] == [32, 64]
    assert configs["unet"]["down_block_types"] == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert configs["unet"]["cross_attention_dim"] == 32
    assert configs["text"]["hidden_size"] == 32 and configs["text"]["num_hidden_layers"] == 2
    full = diffusers_configs(repo_root / "models" / "cldm_v15.yaml")
    assert full["unet"]["down_block_types"][-1] == "DownBlock2D" and full["unet"]["attention_head_dim"] == 8
    with pytest.raises(ValueError, match="SD 1.x"):
        diffusers_configs(repo_root / "models" / "cldm_v21.yaml")


def test_plan_compares_like_with_like_and_adds_our_variants():
    args = build_parser().parse_args(["--tiny", "--resolution", "64", "--checkpointing", "both", "--frozen-dtype",
                                      "fp32", "bf16", "--variant", "frozen-bf16,step-in-backward"])
    args.config = TINY_CONFIG
    jobs = plan(args)
    assert [job.label for job in jobs[:4]] == [
        "ours, ckpt off", "diffusers, ckpt off", "ours, ckpt off, bf16-mixed, frozen bf16",
        "ours, ckpt off, bf16-mixed, frozen bf16, AdamW in backward",
    ]
    assert [job.checkpointing for job in jobs] == [False] * 4 + [True] * 4
    assert all(isinstance(job, Job) and job.resolution == 64 for job in jobs)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--variant", "warp-speed"])
    assert "step-in-backward" in VARIANT_OPTIONS


def test_a_failed_worker_is_reported_in_its_row_and_not_retried(monkeypatch):
    args = build_parser().parse_args(["--tiny", "--resolution", "64", "--checkpointing", "off"])
    args.config = TINY_CONFIG
    ours, theirs = plan(args)
    calls = []

    def fake_worker(job):
        calls.append(job.side)
        if job.side == "diffusers":
            return {"error": "torch.OutOfMemoryError: CUDA out of memory."}
        return {"times": [2.0], "peak_bytes": 2**30, "flops": 4 * 10**9, "operators": 3000, "python_calls": 9000,
                "hook_calls": None, "loss": 0.1, "sizes": {"unet": 1}}

    monkeypatch.setattr(bench_train_step, "run_worker", fake_worker)
    results = bench_train_step.run_all([ours, theirs], rounds=2)
    assert calls == ["ours", "diffusers", "ours"]  # the failed side is not run again in round 2
    assert results[ours]["times"] == [2.0, 2.0]
    failed_row = bench_train_step.format_row(theirs, results, {None: 1e12})
    assert failed_row.endswith("failed: torch.OutOfMemoryError: CUDA out of memory.")
    our_row = [cell.strip() for cell in bench_train_step.format_row(ours, results, {None: 1e12}).split("|")]
    assert our_row[2:5] == ["2.000", "-", "2.000"] and our_row[6] == "0.50"  # no baseline; batch 1 / 2 s
    assert our_row[7:12] == ["4.0", "0.2%", "3.0k", "9.0k", "-"]  # GFLOP per sample, MFU, ops, calls, no hooks


def test_host_memory_rows_follow_each_trainer_and_compare_against_diffusers_default():
    args = build_parser().parse_args(["--tiny", "--resolution", "64", "--checkpointing", "off", "--variant",
                                      "release-host-memory", "--diffusers-retaining-host-memory"])
    args.config = TINY_CONFIG
    jobs = plan(args)
    assert [(job.label, job.retains_host_memory) for job in jobs] == [
        ("ours, ckpt off", True),  # as tutorial_train.py on the CPU
        ("diffusers, ckpt off", False),  # as train_controlnet.py
        ("diffusers, ckpt off, host memory retained", True),
        ("ours, ckpt off, host memory released", False),
    ]
    baseline = {"times": [1.0], "peak_bytes": 1}
    results = {jobs[1]: baseline, jobs[2]: {"times": [9.0], "peak_bytes": 9}}
    assert bench_train_step._baseline(jobs[3], results) is baseline
    assert not replace(jobs[0], device="cuda").retains_host_memory  # on GPUs only when asked for


def test_batch_sizes_and_the_latent_cache_make_rows_of_their_own():
    args = build_parser().parse_args(["--tiny", "--resolution", "64", "--checkpointing", "off", "--batch", "2", "8",
                                      "--variant", "latent-cache", "--gpu-paths", "--no-count"])
    args.config = TINY_CONFIG
    jobs = plan(args)
    assert [(job.batch, job.label) for job in jobs] == [
        (2, "ours, ckpt off"), (2, "diffusers, ckpt off"), (2, "ours, ckpt off, latent cache"),
        (8, "ours, ckpt off"), (8, "diffusers, ckpt off"), (8, "ours, ckpt off, latent cache"),
    ]
    assert all(job.gpu_paths and not job.count for job in jobs)
    results = {job: {"times": [1.0], "peak_bytes": 1} for job in jobs}
    assert bench_train_step._baseline(jobs[5], results) is results[jobs[4]]  # same batch


class Doubler(torch.nn.Module):
    def forward(self, x):
        return x * 2


def test_operators_python_calls_and_hooks_of_a_step_are_counted():
    layers = torch.nn.Sequential(Doubler(), Doubler(), torch.nn.Linear(3, 3))
    for layer in layers:
        layer.register_forward_hook(lambda module, args, output: None)
    x = torch.randn(2, 3, requires_grad=True)

    def step():
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss = layers(x).sum()
        loss.backward()
        return loss

    # forward: mul, mul, linear (addmm and its weight's transpose), sum; backward adds the gradient kernels
    assert bench_train_step.count_operators(step) >= 5
    calls, hooks = bench_train_step.count_python_calls(step, [layers])
    assert calls > hooks
    assert hooks == 3 + 2 + 2  # three forward hooks; pack and unpack of the two tensors Linear saves (x, weight)
