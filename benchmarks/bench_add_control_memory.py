"""Peak resident memory of tool_add_control.py on a random Stable Diffusion checkpoint in the release layout.

The input is what v1-5-pruned.ckpt looks like: a Lightning `state_dict` wrapper with `model_ema.*` copies of the
UNet and training state (7.7 GB float32 for SD1.5). The table gives the tool's peak RSS next to the output's size;
the target is at most the output's size plus 1 GB. Run from the repository root (needs about twice the input's size
of free disk):

    python -m benchmarks.bench_add_control_memory                                # SD1.5, about a minute
    python -m benchmarks.bench_add_control_memory --config models/cldm_tiny.yaml # tiny, for CI
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parent.parent
GB = 1e9
TARGET_MARGIN_BYTES = 1 * GB


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags; the default measures SD1.5."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="models/cldm_v15.yaml", help="ControlLDM config of the random model")
    parser.add_argument("--folder", default=None, help="where the checkpoints go (default: a temporary folder)")
    return parser


def _write_release_layout(model_checkpoint: Path, release_checkpoint: Path) -> None:
    """Wrap a model-layout SD checkpoint as the release does: `state_dict`, `model_ema.*`, training state."""
    state_dict = torch.load(model_checkpoint, mmap=True, weights_only=True)
    release = dict(state_dict)
    for key, value in state_dict.items():
        if key.startswith("model.diffusion_model."):  # LitEma's names: the parameter name without dots
            release["model_ema." + key.removeprefix("model.").replace(".", "")] = value.clone()
    release["model_ema.decay"] = torch.tensor(0.9999)
    release["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    torch.save({"state_dict": release, "epoch": 6, "global_step": 840000}, release_checkpoint)


def _make_input(config: str, folder: Path) -> Path:
    """A random SD checkpoint of `config` in the release layout, each step in its own process."""
    model_checkpoint, release_checkpoint = folder / "sd_model.ckpt", folder / "sd_release.ckpt"
    subprocess.run([sys.executable, str(REPOSITORY / "tool_make_random_sd.py"), "--config", config, str(model_checkpoint)],
                   check=True, stdout=subprocess.DEVNULL)
    process = multiprocessing.get_context("spawn").Process(
        target=_write_release_layout, args=(model_checkpoint, release_checkpoint)
    )
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"writing the release layout failed (exit code {process.exitcode})")
    model_checkpoint.unlink()
    return release_checkpoint


def _peak_rss_of(command: list[str]) -> tuple[int, float]:
    """Run `command`; its peak resident set size in bytes and its wall time in seconds."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {process.returncode}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.folder) as temporary:
        folder = Path(temporary)
        source = _make_input(args.config, folder)
        output = folder / "control_ini.ckpt"
        peak, seconds = _peak_rss_of(
            [sys.executable, str(REPOSITORY / "tool_add_control.py"), str(source), str(output), "--config", args.config]
        )
        input_size, output_size = source.stat().st_size, output.stat().st_size
    target = output_size + TARGET_MARGIN_BYTES
    print("| config | input | output | peak RSS | target (output + 1 GB) | within | time |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.config} | {input_size / GB:.2f} GB | {output_size / GB:.2f} GB | {peak / GB:.2f} GB "
          f"| {target / GB:.2f} GB | {'yes' if peak <= target else 'NO'} | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
