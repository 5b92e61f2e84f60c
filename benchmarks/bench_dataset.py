"""Loader throughput: samples/s of one DataLoader worker on a generated Fill50K folder, and the workers a GPU step needs.

One worker's rate is `MyDataset[i]` in a loop in this process (read both PNGs, convert to RGB, resize to
`--resolution`, make the float hint and target): a DataLoader worker does exactly that, then pickles the sample to
the main process. The shard rows do the same from the folder's WebDataset shards (tool_make_shards.py,
`--shard-size` items each): "read tar members only" streams the members without decoding them, "ShardStream item"
is one reader of `--data_shards` (read, shuffle buffer, decode, frame), the same work as a `MyDataset` item. The
image-folder row reads the same pairs through a metadata.jsonl (hard links to the same files).
"decode only" is the two `cv2.imread`s of a pair, the floor of any PNG layout. The DataLoader rows add batching
and, with workers, inter-process transfer; on a machine with fewer free cores than workers they show the cores, not
the loader. "workers for N samples/s" is ceil(N / one worker's rate) for the GPU training rates
measured in the README (H200: 23.0 samples/s at batch 4 in bf16, 87.2 samples/s with the latent cache at batch 32).

`--bucket-histogram` instead prints how `--buckets` groups a mixed-size image-folder data set (`MIXED_SIZES`: 4:3,
3:4, 16:9, 9:16, 1:1, 4:1 and odd sizes) at `--resolution`: the training job's `use_buckets` on that folder.

Run from the repository root:

    python -m benchmarks.bench_dataset                                   # 256 pairs at 512 px
    python -m benchmarks.bench_dataset --pairs 16 --size 64 --loader-workers 0   # tiny, for CI
    python -m benchmarks.bench_dataset --bucket-histogram --resolution 512
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from torch.utils.data import DataLoader

from cldm.data.buckets import bucket_histogram, bucket_sizes
from cldm.data.dataset import MyDataset
from cldm.data.fill50k import generate_fill50k
from cldm.data.images import read_color
from cldm.data.layouts import IMAGE_KEYS
from cldm.data.shard_stream import ShardStream, shard_list
from cldm.data.shards import make_shards, shard_items
from cldm.training.job import use_buckets

# GPU training rates measured on one H200 (README, Performance): tutorial_train.py in bf16 at batch 4, and with
# the latent cache and the optimizer in backward at batch 32.
GPU_SAMPLES_PER_S = (23.0, 87.2)
# (width, height): items of the mixed-size data set of --bucket-histogram.
MIXED_SIZES = {(640, 480): 5, (480, 640): 4, (1280, 720): 3, (720, 1280): 2, (512, 512): 6, (1000, 1000): 2,
               (500, 333): 2, (333, 500): 2, (777, 555): 2, (1024, 256): 1, (300, 700): 1}


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags; the defaults measure the tutorial's setting (512 px, batch 4)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256, help="pairs to generate, then to load")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--resolution", type=int, default=None, help="MyDataset's --resolution (default: --size)")
    parser.add_argument("--generator-workers", type=int, default=2, help="processes of the generator")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers to time")
    parser.add_argument("--batch-size", type=int, default=4, help="DataLoader batch size")
    parser.add_argument("--shard-size", type=int, default=64, help="items per shard of the shard rows")
    parser.add_argument("--bucket-histogram", action="store_true",
                        help="print the --buckets histogram of a mixed-size data set at --resolution instead")
    parser.add_argument("--gpu-samples-per-s", type=float, nargs="+", default=list(GPU_SAMPLES_PER_S),
                        help="GPU training rates to translate into DataLoader workers")
    return parser


def time_generator(folder: Path, pairs: int, size: int, workers: int) -> float:
    """Pairs per second of `generate_fill50k`, process start-up included."""
    started = time.perf_counter()
    generate_fill50k(folder, pairs, size, seed=0, workers=workers, show_progress=False)
    return pairs / (time.perf_counter() - started)


def time_one_worker(dataset: MyDataset) -> float:
    """Samples per second of `dataset[i]` over every item, after one warm-up item: one worker's rate."""
    dataset[0]
    started = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    return len(dataset) / (time.perf_counter() - started)


def time_decode(dataset: MyDataset) -> float:
    """Pairs per second of decoding both PNGs of every item, nothing else."""
    paths = [str(Path(dataset.root) / item[key]) for item in dataset.data for key in IMAGE_KEYS]
    started = time.perf_counter()
    for path in paths:
        read_color(path)
    return len(dataset) / (time.perf_counter() - started)


def time_loader(dataset: MyDataset, batch_size: int, num_workers: int) -> float:
    """Samples per second of one shuffled epoch, timed from the first batch so that worker start-up is left out."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    batches = iter(loader)
    next(batches)
    started = time.perf_counter()
    samples = sum(len(batch["txt"]) for batch in batches)
    return samples / (time.perf_counter() - started)


def time_shards(urls: list[str], stream: ShardStream) -> tuple[float, float]:
    """Pairs per second of reading the members of every shard, and samples per second of one reader of `stream`
    (the whole epoch in this process, after its first item)."""
    started = time.perf_counter()
    items = 0
    for url in urls:
        with open(url, "rb") as file:
            items += sum(1 for _ in shard_items(file, url))
    read_rate = items / (time.perf_counter() - started)
    samples = iter(stream)
    next(samples)
    started = time.perf_counter()
    count = sum(1 for _ in samples)
    return read_rate, count / (time.perf_counter() - started)


def as_image_folder(fill50k: MyDataset, folder: Path) -> Path:
    """The pairs of the Fill50K data set `fill50k` in the image-folder layout (metadata.jsonl with diffusers' column
    names), its images hard links to the same files."""
    folder.mkdir()
    rows = []
    for record in fill50k.data:
        for key in IMAGE_KEYS:
            (folder / key).mkdir(exist_ok=True)
            os.link(Path(fill50k.root, record[key]), folder / record[key])
        rows.append({"image": record["target"], "conditioning_image": record["source"], "text": record["prompt"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return folder


def write_mixed_sizes(folder: Path, sizes: dict[tuple[int, int], int]) -> Path:
    """An image-folder data set (metadata.jsonl) of flat-coloured pairs: `sizes[(width, height)]` items of each
    size."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for width, height in (size for size, count in sizes.items() for _ in range(count)):
        name = f"images/{len(rows):04d}_{width}x{height}"
        image = np.full((height, width, 3), len(rows) * 9 % 256, np.uint8)
        for suffix in ("", "_hint"):
            cv2.imwrite(str(folder / f"{name}{suffix}.png"), image)
        rows.append({"image": f"{name}.png", "conditioning_image": f"{name}_hint.png", "text": name})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return folder


def bucket_histogram_line(resolution: int) -> str:
    """How `--buckets` at `resolution` groups the `MIXED_SIZES` data set, as the training job logs it."""
    with tempfile.TemporaryDirectory() as scratch:
        dataset = MyDataset(root=str(write_mixed_sizes(Path(scratch), MIXED_SIZES)), resolution=resolution)
        use_buckets(dataset, resolution)
    buckets = bucket_sizes(resolution)
    return (f"{len(dataset)} items of {len(MIXED_SIZES)} sizes, --resolution {resolution}: "
            f"{bucket_histogram([buckets.index(size) for size in dataset.out_sizes], buckets)}")


def markdown_table(header: tuple[str, str], rows: list[tuple[str, str]]) -> list[str]:
    """The rows as a Markdown table, ready to paste into benchmarks/results.md."""
    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def main(argv: list[str] | None = None) -> None:
    """Generate a temporary Fill50K folder, time the generator, one worker and the DataLoader, print a table (or,
    with --bucket-histogram, the bucket histogram of a mixed-size folder)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bucket_histogram:
        print(bucket_histogram_line(args.resolution or args.size))
        return
    if args.pairs <= args.batch_size:
        parser.error(f"--pairs must exceed --batch-size {args.batch_size} so that batches after the first are timed.")
    resolution = args.resolution or args.size
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "fill50k"
        rate = time_generator(folder, args.pairs, args.size, args.generator_workers)
        rows.append((f"generator, --workers {args.generator_workers}", f"{rate:.1f} pairs/s"))
        dataset = MyDataset(root=str(folder), resolution=resolution)
        rows.append(("decode only (2 PNGs), 1 worker", f"{time_decode(dataset):.1f} pairs/s"))
        per_worker = time_one_worker(dataset)
        rows.append(("MyDataset item, 1 worker", f"{per_worker:.1f} samples/s"))
        image_folder = MyDataset(root=str(as_image_folder(dataset, Path(scratch) / "image_folder")),
                                 resolution=resolution)
        rows.append(("image folder (metadata.jsonl): MyDataset item, 1 worker",
                     f"{time_one_worker(image_folder):.1f} samples/s"))
        make_shards(str(folder), Path(scratch) / "shards", args.shard_size)
        urls, counts = shard_list([str(Path(scratch) / "shards")])
        stream = ShardStream(urls, counts, args.batch_size, 1, seed=0, resolution=resolution)
        read_rate, shard_rate = time_shards(urls, stream)
        rows.append((f"shards of {args.shard_size}: read tar members only, 1 worker", f"{read_rate:.1f} pairs/s"))
        rows.append((f"shards of {args.shard_size}: ShardStream item, 1 worker", f"{shard_rate:.1f} samples/s"))
        for num_workers in args.loader_workers:
            rate = time_loader(dataset, args.batch_size, num_workers)
            rows.append((f"DataLoader, batch {args.batch_size}, num_workers {num_workers}", f"{rate:.1f} samples/s"))
    for gpu_rate in args.gpu_samples_per_s:
        rows.append((f"workers for {gpu_rate:g} samples/s (folder / shards)",
                     f"{math.ceil(gpu_rate / per_worker)} / {math.ceil(gpu_rate / shard_rate)}"))
    print(f"Fill50K layout, the image-folder layout and shards of the same {args.pairs} pairs of {args.size} px PNGs, --resolution {resolution}")
    print()
    print("\n".join(markdown_table(("what", "rate"), rows)))


if __name__ == "__main__":
    main()
