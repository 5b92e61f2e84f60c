"""Throughput of the Fill50K generator (pairs/s) and of MyDataset behind a DataLoader (samples/s).

Run from the repository root:

    python -m benchmarks.bench_dataset                                   # 500 pairs at 512 px
    python -m benchmarks.bench_dataset --pairs 16 --size 64 --loader-workers 0   # tiny, for CI
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from cldm.data.fill50k import generate_fill50k
from cldm.data.dataset import MyDataset


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags; the defaults measure the tutorial's setting (512 px, batch 4)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pairs", type=int, default=500, help="pairs to generate, then to load")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--generator-workers", type=int, default=2, help="processes of the generator")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers to time")
    parser.add_argument("--batch-size", type=int, default=4, help="DataLoader batch size")
    return parser


def time_generator(folder: Path, pairs: int, size: int, workers: int) -> float:
    """Pairs per second of `generate_fill50k`, process start-up included."""
    started = time.perf_counter()
    generate_fill50k(folder, pairs, size, seed=0, workers=workers, show_progress=False)
    return pairs / (time.perf_counter() - started)


def time_loader(folder: Path, batch_size: int, num_workers: int) -> float:
    """Samples per second of one shuffled epoch, timed from the first batch so that worker start-up is left out."""
    loader = DataLoader(MyDataset(root=str(folder)), batch_size=batch_size, shuffle=True, num_workers=num_workers)
    batches = iter(loader)
    next(batches)
    started = time.perf_counter()
    samples = sum(len(batch["txt"]) for batch in batches)
    return samples / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    """Generate a temporary data set, time the generator and the loader, print a table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pairs <= args.batch_size:
        parser.error(f"--pairs must exceed --batch-size {args.batch_size} so that batches after the first are timed.")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "fill50k"
        rate = time_generator(folder, args.pairs, args.size, args.generator_workers)
        rows.append((f"generator, {args.generator_workers} workers", f"{rate:.1f} pairs/s"))
        for num_workers in args.loader_workers:
            rate = time_loader(folder, args.batch_size, num_workers)
            rows.append((f"MyDataset, batch {args.batch_size}, num_workers {num_workers}", f"{rate:.1f} samples/s"))
    print(f"Fill50K at {args.size} px, {args.pairs} pairs")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>16}")


if __name__ == "__main__":
    main()
