"""Peak resident memory of the checkpoint tools on random Stable Diffusion checkpoints in the release layout.

The base input is what v1-5-pruned.ckpt looks like: a Lightning `state_dict` wrapper with `model_ema.*` copies of
the UNet and training state (7.7 GB float32 for SD1.5); the fine-tune (the same weights, each moved a little) is a
plain `.safetensors` of the model's keys, as fine-tunes are shared. Three rows, each tool in its own process:

- tool_add_control.py (tool_add_control_sd21.py for an SD2.x config) on the base `.ckpt`,
- the same tool on the fine-tune `.safetensors`,
- tool_transfer_control.py: the first row's output as the ControlNet, moved from the base onto the fine-tune.

The table gives each tool's peak RSS next to its output's size; the target is at most the output's size plus 1 GB.
Run from the repository root (needs about four times the base input's size of free disk):

    python -m benchmarks.bench_add_control_memory                                # SD1.5, about six minutes
    python -m benchmarks.bench_add_control_memory --config models/cldm_v21.yaml  # SD2.1
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

from cldm.checkpoints.initial_weights import SCRIPTS
from cldm.checkpoints.saving import save_state_dict
from cldm.model import read_control_stage_config

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


def _write_finetune(model_checkpoint: Path, finetuned: Path) -> None:
    """A fine-tune of a model-layout SD checkpoint: every float weight moved a little, saved as .safetensors."""
    generator = torch.Generator().manual_seed(1)
    state_dict = torch.load(model_checkpoint, mmap=True, weights_only=True)
    for key, value in state_dict.items():
        if value.is_floating_point():
            state_dict[key] = value + 0.01 * torch.randn(value.shape, generator=generator, dtype=value.dtype)
    save_state_dict(state_dict, finetuned)


def _make_inputs(config: str, folder: Path) -> tuple[Path, Path]:
    """A random SD checkpoint of `config` in the release layout and a fine-tune of it as .safetensors, each made
    in its own process."""
    model_checkpoint = folder / "sd_model.ckpt"
    release, finetuned = folder / "sd_release.ckpt", folder / "sd_finetuned.safetensors"
    make_random_sd = [sys.executable, str(REPOSITORY / "tool_make_random_sd.py"), "--config", config]
    subprocess.run([*make_random_sd, str(model_checkpoint)], check=True, stdout=subprocess.DEVNULL)
    for write, output in ((_write_release_layout, release), (_write_finetune, finetuned)):
        process = multiprocessing.get_context("spawn").Process(target=write, args=(model_checkpoint, output))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"writing {output.name} failed (exit code {process.exitcode})")
    model_checkpoint.unlink()
    return release, finetuned


def _add_control_tool(config: str) -> str:
    """tool_add_control.py, or its SD2.x variant for a config with SD2.x's 1024-wide text context."""
    return SCRIPTS["sd2" if read_control_stage_config(config).params.context_dim == 1024 else "sd1"]


def _peak_rss_of(command: list[str]) -> tuple[int, float]:
    """Run `command`; its peak resident set size in bytes and its wall time in seconds."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {process.returncode}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def _row(config: str, tool: str, inputs: list[Path], output: Path, extra: list[str]) -> str:
    """Run `tool` on `inputs` to `output`; its table row."""
    peak, seconds = _peak_rss_of([sys.executable, str(REPOSITORY / tool), *map(str, inputs), str(output), *extra])
    input_size, output_size = sum(path.stat().st_size for path in inputs), output.stat().st_size
    target = output_size + TARGET_MARGIN_BYTES
    described = f"{tool} {', '.join(path.suffix for path in inputs)}"
    return (f"| {config} | {described} | {input_size / GB:.2f} GB | {output_size / GB:.2f} GB | {peak / GB:.2f} GB "
            f"| {target / GB:.2f} GB | {'yes' if peak <= target else 'NO'} | {seconds:.1f} s |")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    add_tool = _add_control_tool(args.config)
    config_flag = ["--config", args.config]
    with tempfile.TemporaryDirectory(dir=args.folder) as temporary:
        folder = Path(temporary)
        release, finetuned = _make_inputs(args.config, folder)
        control = folder / "control_ini.ckpt"
        rows = [_row(args.config, add_tool, [release], control, config_flag)]
        from_safetensors = folder / "control_from_safetensors.ckpt"
        rows.append(_row(args.config, add_tool, [finetuned], from_safetensors, config_flag))
        from_safetensors.unlink()
        rows.append(_row(args.config, "tool_transfer_control.py", [release, control, finetuned],
                         folder / "control_transferred.ckpt", []))
    print("| config | tool and inputs | inputs | output | peak RSS | target (output + 1 GB) | within | time |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
