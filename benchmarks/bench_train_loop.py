"""Training-loop speed of a config in the units of the published figure: s/it at a global batch, and samples/s.

The published DeepSparkHub figure is 5.02 s/it on 8 GPUs at batch 4 per GPU (global batch 32), fp32.
The loop is the real one (Lightning fit, DDP when --devices > 1) on synthetic batches and random weights,
so no data set or checkpoint is needed; image logging and checkpoints are off.

    python -m benchmarks.bench_train_loop --config models/cldm_tiny.yaml --resolution 64 --steps 20
    python -m benchmarks.bench_train_loop --config models/cldm_v15.yaml --resolution 512 --batch_size 4 \\
        --accelerator gpu --devices 8 --strategy ddp --precision 32
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from cldm.model import create_model
from cldm.training.job import apply_host_memory_option
from cldm.checkpoints.random_weights import randomize_

PUBLISHED = "5.02 s/it, 8 GPUs x batch 4 (global 32), fp32 (DeepSparkHub, BI-V100)"


class SyntheticPairs(Dataset):
    """Random target/hint images and a fixed prompt, in the data set's format."""

    def __init__(self, length: int, resolution: int):
        self.length = length
        self.resolution = resolution

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        size = (self.resolution, self.resolution, 3)
        return {"jpg": (torch.rand(size, generator=generator) * 2 - 1).numpy(),
                "hint": torch.rand(size, generator=generator).numpy(),
                "txt": "light coral circle with medium sea green background"}


class StepTimer(pl.Callback):
    """Wall time of each training batch (forward, backward, optimizer step)."""

    def __init__(self):
        self.durations: list[float] = []
        self._start = 0.0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.durations.append(time.perf_counter() - self._start)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="models/cldm_tiny.yaml")
    parser.add_argument("--resolution", type=int, default=64, help="image size in pixels (latent = /8)")
    parser.add_argument("--batch_size", type=int, default=4, help="per device")
    parser.add_argument("--precision", default="32", help="32, bf16-mixed or 16-mixed")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="override the config's use_checkpoint")
    parser.add_argument("--retain_host_memory", action=argparse.BooleanOptionalAction, default=None,
                        help="keep freed host memory for reuse (default: on the CPU, as tutorial_train.py)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    torch.manual_seed(0)
    model = create_model(args.config)
    randomize_(model, torch.Generator().manual_seed(0))
    if args.gradient_checkpointing is not None:
        model.model.diffusion_model.set_gradient_checkpointing(args.gradient_checkpointing)
        model.control_model.set_gradient_checkpointing(args.gradient_checkpointing)
    apply_host_memory_option(args)
    total_steps = args.warmup + args.steps
    data = DataLoader(SyntheticPairs(total_steps * args.batch_size * args.devices, args.resolution),
                      batch_size=args.batch_size, shuffle=False)
    timer = StepTimer()
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=args.strategy,
                         precision=args.precision, max_steps=total_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(model, train_dataloaders=data)
    if trainer.global_rank != 0:
        return 0
    timed = timer.durations[args.warmup:]
    seconds_per_it = statistics.median(timed)
    global_batch = args.batch_size * trainer.world_size
    rows = [("config", args.config), ("device", f"{trainer.accelerator.__class__.__name__} x {trainer.world_size}"),
            ("resolution", f"{args.resolution} px"), ("batch per device / global", f"{args.batch_size} / {global_batch}"),
            ("precision", trainer.precision), ("timed steps", str(len(timed))),
            ("s/it (median)", f"{seconds_per_it:.3f}"), ("samples/s", f"{global_batch / seconds_per_it:.2f}"),
            ("published", PUBLISHED)]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
