"""One-shot GPU check: our training step against diffusers' on one GPU, and tutorial_train.py end to end.

Prints one table (SD1.5 architecture, random weights, bf16-mixed, 512 px):
- the step at batch 4, both sides, gradient checkpointing off and on: ours with tutorial_train.py's GPU defaults
  (frozen weights in bf16, weight casts kept), and without checkpointing also ours with the float32 frozen weights
  and the recomputed weight casts that are the CPU's defaults, ours lean (AdamW in backward), and lean with the
  latent cache;
- the best batch of each side in a sweep (diffusers; ours lean with the cache; no checkpointing), by samples/s;
- `tutorial_train.py` end to end on a small synthetic Fill50K (steady-state samples/s from its CSV log), once with
  `--precision bf16-mixed` alone at batch 4 and once lean with the latent cache at our best batch; their inputs (a
  random SD1.5 and the data) are made on the host while the GPU-bound batch sweep runs.
Every row has its peak GPU memory, and the batch-4 rows without checkpointing a profiled step (written beside).
Step rows come from `benchmarks.bench_train_step` (one process per row); MFU is counted FLOPs per second against
the bf16 matmul peak measured here.

    bash benchmarks/gpu_check.sh                       # installs missing packages from benchmarks/wheels/, then this
    python -m benchmarks.gpu_check --out gpu_check_out  # the same, with the packages already installed
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.bench_train_step import FULL_CONFIG, GIB, Job, matmul_peak_flops, run_all

REPO_ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 512
# tutorial_train.py's defaults on a GPU under bf16-mixed (frozen weights in bf16, casts kept); checkpointing is a row's.
GPU_DEFAULTS = {"frozen_dtype": "bf16"}
LEAN = {**GPU_DEFAULTS, "adamw": "in-backward"}
LEAN_FLAGS = ["--optimizer_in_backward"]


# ---------------------------------------------------------------------------------------------
# Step rows
# ---------------------------------------------------------------------------------------------


def step_jobs(batch_sizes: list[int], steps: int, warmup: int) -> tuple[list[tuple[str, Job]], list[Job]]:
    """The batch-4 rows (title, job) and the batch sweep (each side's fastest setting)."""
    base = Job(side="ours", config=FULL_CONFIG, device="cuda", resolution=RESOLUTION, batch=4, precision="bf16-mixed",
               checkpointing=False, encoders=True, steps=steps, warmup=warmup, profile=True)
    ours = replace(base, **GPU_DEFAULTS)
    with_checkpointing = replace(ours, checkpointing=True, profile=False)
    at_four = [
        ("diffusers step", replace(base, side="diffusers")),
        ("ours step (tutorial_train defaults)", ours),
        ("ours, frozen weights in fp32", replace(base)),
        ("ours, weight casts recomputed", replace(ours, recompute_casts=True)),
        ("ours, lean (AdamW in backward)", replace(base, **LEAN)),
        ("ours, lean + latent cache", replace(base, **LEAN, latent_cache=True)),
        ("diffusers step", replace(with_checkpointing, side="diffusers", frozen_dtype="fp32")),
        ("ours step (tutorial_train defaults)", with_checkpointing),
    ]
    sweep = []
    for batch in batch_sizes:
        row = replace(base, batch=batch, steps=max(2, steps // 2), warmup=2, count=False, profile=False)
        sweep += [replace(row, side="diffusers"), replace(row, **LEAN, latent_cache=True)]
    return at_four, sweep


def best_by_side(jobs: list[Job], results: dict) -> dict[str, Job]:
    """The sweep's fastest job (samples/s) of each side, among those that ran."""
    best: dict[str, Job] = {}
    for job in jobs:
        if "error" in results[job]:
            continue
        if job.side not in best or samples_per_second(job, results) > samples_per_second(best[job.side], results):
            best[job.side] = job
    return best


def samples_per_second(job: Job, results: dict) -> float:
    return job.batch / statistics.median(results[job]["times"])


def write_profiles(jobs: list[Job], results: dict, out: Path) -> list[str]:
    """Each profiled step's operator table into `out`; one line per step: wall time, device busy time, kernels."""
    lines = []
    for job in jobs:
        profile = results[job].get("profile")
        if profile is None:
            continue
        name = "profile_" + "".join(c if c.isalnum() else "_" for c in job.label) + ".txt"
        (out / name).write_text(profile["table"])
        lines.append(f"profiled step, {job.label}, batch {job.batch}: {profile['wall_seconds']:.3f} s wall, GPU busy "
                     f"{profile['device_seconds']:.3f} s, {profile['kernels']} kernels ({name})")
    return lines


# ---------------------------------------------------------------------------------------------
# End-to-end rows: tutorial_train.py on synthetic Fill50K and a random SD1.5
# ---------------------------------------------------------------------------------------------


def run_logged(command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run a repository command, its output into `log`; a failure raises with the log's tail."""
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.run(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    script = next(part for part in command if part.endswith(".py"))
    print(f"  {script}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{log.read_text()[-3000:]}")


def prepare_run_inputs(out: Path, pairs: int) -> tuple[Path, Path]:
    """Synthetic Fill50K at 512 px (kept if present) and the initial ControlLDM weights of a random SD1.5."""
    python = sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": "4"}  # leave the other cores to the step rows measured meanwhile
    data = out / "fill50k"
    if not (data / "prompt.json").is_file():
        run_logged(["nice", python, "tool_make_fill50k.py", "--out", str(data), "--count", str(pairs), "--size",
                    str(RESOLUTION), "--workers", "4", "--quiet"], out / "make_fill50k.log", env)
    base, initial = out / "random_sd15.ckpt", out / "control_sd15_ini.ckpt"
    if not initial.is_file():
        run_logged(["nice", python, "tool_make_random_sd.py", "--config", FULL_CONFIG, str(base)],
                   out / "make_random_sd.log", env)
        run_logged(["nice", python, "tool_add_control.py", "--config", FULL_CONFIG, str(base), str(initial)],
                   out / "add_control.log", env)
        base.unlink()
    return data, initial


class PreparingRunInputs(threading.Thread):
    """`prepare_run_inputs` in the background (niced, four threads) while the GPU measures the batch sweep."""

    def __init__(self, out: Path, pairs: int) -> None:
        super().__init__(daemon=True)
        self.out, self.pairs = out, pairs
        self.inputs: tuple[Path, Path] | Exception | None = None

    def run(self) -> None:
        try:
            self.inputs = prepare_run_inputs(self.out, self.pairs)
        except RuntimeError as error:
            self.inputs = error


def start_preparing_run_inputs(out: Path, pairs: int) -> PreparingRunInputs:
    preparing = PreparingRunInputs(out, pairs)
    preparing.start()
    return preparing


class GpuMemoryPeak:
    """Highest GPU memory in use (nvidia-smi, all processes) while the context runs, polled twice a second."""

    def __init__(self) -> None:
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            try:
                query = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                       capture_output=True, text=True, check=False)
            except OSError:  # no nvidia-smi: the peak stays unknown (0)
                return
            if query.returncode == 0 and query.stdout.strip():
                self.peak_mib = max(self.peak_mib, int(query.stdout.split()[0]))

    def __enter__(self) -> GpuMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def steady_samples_per_second(metrics_csv: Path) -> float:
    """Samples per second of the median step in the second half of the run (warm-up excluded, and so are the
    restarts of a small data set's epochs), from the cumulative samples and seconds that the throughput monitor
    logs every step."""
    with metrics_csv.open() as handle:
        points = [(float(row["train/time"]), int(float(row["train/samples"]))) for row in csv.DictReader(handle)
                  if row.get("train/time") and row.get("train/samples")]
    if len(points) < 4:
        raise RuntimeError(f"{metrics_csv} logs fewer than 4 steps of train/time and train/samples")
    second_half = points[len(points) // 2 - 1:]
    rates = [(samples - earlier_samples) / (time - earlier_time)
             for (earlier_time, earlier_samples), (time, samples) in zip(second_half, second_half[1:])]
    return statistics.median(rates)


def train_end_to_end(name: str, out: Path, data: Path, initial: Path, batch: int, steps: int,
                     extra: list[str]) -> dict:
    """tutorial_train.py for `steps` steps (no image logs, checkpoint only at the end); samples/s and GPU peak."""
    root = out / name
    command = [sys.executable, "tutorial_train.py", "--config", FULL_CONFIG, "--resume_path", str(initial),
               "--data_root", str(data), "--batch_size", str(batch), "--precision", "bf16-mixed",
               "--max_steps", str(steps), "--logger_freq", str(10 * steps),
               "--checkpoint_every_n_steps", str(10 * steps), "--seed", "0", "--default_root_dir", str(root), *extra]
    with GpuMemoryPeak() as memory:
        run_logged(command, out / f"{name}.log")
    metrics = sorted(root.glob("lightning_logs/version_*/metrics.csv"))[-1]
    return {"samples_per_sec": steady_samples_per_second(metrics), "peak_gib": memory.peak_mib / 1024,
            "command": " ".join(command[1:])}


def end_to_end_rows(args: argparse.Namespace, inputs: tuple[Path, Path] | Exception | None,
                    ours_best: Job | None) -> list[list[str]]:
    """tutorial_train.py with --precision bf16-mixed alone at batch 4, and lean with the latent cache at the batch
    that was fastest in the sweep; a failure becomes its row (the log holds the rest)."""
    if not isinstance(inputs, tuple):
        print(inputs, file=sys.stderr)
        return [["tutorial_train.py", "", "", "inputs failed: see make_*.log", "", "", "", ""]]
    data, initial = inputs
    runs = [("train_default", 4, [])]
    if ours_best is not None:
        cache = args.out / "latent_cache"
        try:
            if not cache.is_dir():
                run_logged([sys.executable, "tool_cache_latents.py", "--config", FULL_CONFIG, "--resume_path",
                            str(initial), "--data_root", str(data), "--out", str(cache)], args.out / "cache.log")
            runs.append(("train_lean_cache", ours_best.batch, [*LEAN_FLAGS, "--latent_cache", str(cache)]))
        except RuntimeError as error:
            print(error, file=sys.stderr)
    rows = []
    for name, batch, extra in runs:
        title = "tutorial_train.py --precision bf16-mixed" + (" --optimizer_in_backward --latent_cache" * bool(extra))
        try:
            run = train_end_to_end(name, args.out, data, initial, batch, args.train_steps, extra)
        except RuntimeError as error:
            print(error, file=sys.stderr)
            rows.append([title, str(batch), "off", "failed: see " + name + ".log", "", "", "", ""])
            continue
        rows.append([title, str(batch), "off", f"{batch / run['samples_per_sec']:.3f}", f"{run['samples_per_sec']:.1f}",
                     "", "", f"{run['peak_gib']:.2f} (nvidia-smi)"])
    return rows


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def step_row(title: str, job: Job, results: dict, peak_flops: float, diffusers_job: Job | None) -> list[str]:
    result = results[job]
    if "error" in result:
        return [title, str(job.batch), "on" if job.checkpointing else "off", "failed: " + result["error"][:60],
                "", "", "", ""]
    seconds = statistics.median(result["times"])
    theirs = results.get(diffusers_job) if diffusers_job is not None else None
    ratio = f"{seconds / statistics.median(theirs['times']):.2f}x" if theirs and "error" not in theirs else "-"
    mfu = f"{100 * result['flops'] / seconds / peak_flops:.1f}%" if result.get("flops") else "-"
    return [title, str(job.batch), "on" if job.checkpointing else "off", f"{seconds:.3f}", f"{job.batch / seconds:.1f}",
            ratio, mfu, f"{result['peak_bytes'] / GIB:.2f}"]


def print_table(rows: list[list[str]]) -> None:
    header = ["row", "batch", "ckpt", "s/step", "samples/s", "time vs diffusers", "MFU", "peak GiB"]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * width for width in widths], *rows]:
        print(" | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder for logs, data and runs")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32], help="the batch sweep")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per batch-4 row (half in the sweep)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per batch-4 row")
    parser.add_argument("--train-steps", type=int, default=40, help="steps of each end-to-end run")
    parser.add_argument("--pairs", type=int, default=480, help="synthetic Fill50K pairs for the end-to-end runs")
    parser.add_argument("--skip-end-to-end", action="store_true", help="only the step rows")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA GPU; torch.cuda.is_available() is False.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    peak = matmul_peak_flops(device, torch.bfloat16)
    import diffusers
    import pytorch_lightning
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, Lightning {pytorch_lightning.__version__},"
          f" diffusers {diffusers.__version__}; bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; SD1.5, random weights, "
          f"bf16-mixed, {RESOLUTION} px", flush=True)

    at_four, sweep = step_jobs(args.batch_sizes, args.steps, args.warmup)
    results = run_all([job for _, job in at_four], rounds=1)  # alone: at batch 4 the host's speed is the step's
    preparing = None if args.skip_end_to_end else start_preparing_run_inputs(args.out, args.pairs)
    results.update(run_all(sweep, rounds=1))
    rows = []
    for title, job in at_four:
        diffusers_job = replace(at_four[0][1], checkpointing=job.checkpointing, profile=job.profile)
        rows.append(step_row(title, job, results, peak, diffusers_job))
    best = best_by_side(sweep, results)
    for side, job in sorted(best.items()):
        title = "diffusers step, best batch" if side == "diffusers" else "ours, lean + latent cache, best batch"
        rows.append(step_row(title, job, results, peak, best.get("diffusers")))
    swept = ", ".join(f"{job.side}{'+cache' if job.latent_cache else ''} b{job.batch}: "
                      + ("failed" if "error" in results[job] else f"{samples_per_second(job, results):.1f}")
                      for job in sweep)

    if preparing is not None:
        preparing.join()
        rows += end_to_end_rows(args, preparing.inputs, best.get("ours"))
    print_table(rows)
    print(f"batch sweep, samples/s: {swept}")
    for line in write_profiles([job for _, job in at_four], results, args.out):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
