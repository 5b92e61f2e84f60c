"""The training-step benchmark runs end to end at the tiny size and compares like with like (no timing asserted)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_train_step import TINY_CONFIG, VARIANT_OPTIONS, Job, build_parser, diffusers_configs, plan

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_prints_the_table_for_both_sides_of_the_same_architecture():
    command = [sys.executable, "-m", "benchmarks.bench_train_step", "--tiny", "--resolution", "64", "--steps", "1",
               "--warmup", "0", "--rounds", "1", "--checkpointing", "off"]
    process = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert process.returncode == 0, process.stderr[-3000:]
    out = process.stdout
    assert "res/latent" in out and "GFLOP/s" in out
    rows = {match[1].strip(): match[2] for match in re.finditer(r"^64px/8\s+\| ([^|]+)\|(.*)$", out, re.MULTILINE)}
    assert set(rows) == {"ours, ckpt off", "diffusers, ckpt off"}
    # Same architecture: identical parameter counts and identical FLOPs per step.
    sizes = re.findall(r"^\s+(ours|diffusers)\s+params \(M\): (.*)$", out, re.MULTILINE)
    assert len(sizes) == 2 and sizes[0][1] == sizes[1][1]
    gflops = {label: cells.split("|")[4].strip() for label, cells in rows.items()}
    assert gflops["ours, ckpt off"] == gflops["diffusers, ckpt off"] != "-"


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
        "ours, ckpt off, bf16-mixed, frozen bf16, AdamW step in backward",
    ]
    assert [job.checkpointing for job in jobs] == [False] * 4 + [True] * 4
    assert all(isinstance(job, Job) and job.resolution == 64 for job in jobs)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--variant", "warp-speed"])
    assert "step-in-backward" in VARIANT_OPTIONS
