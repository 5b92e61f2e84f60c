"""`--data_shards`: training from WebDataset shards (`cldm.data.shard_stream`) instead of a data set folder; the
flag checks, the stream and what the job checks before training."""
from __future__ import annotations

import argparse

import torch
from pytorch_lightning.utilities import rank_zero_info

from cldm.data.shard_stream import ShardStream, empty_shard, open_shard, shard_list
from cldm.data.shards import decode_item, shard_items
from cldm.training.batch_probe import MAX_BATCH

DEFAULT_DATA_ROOT = "./training/fill50k"


def check_shard_args(args: argparse.Namespace) -> None:
    """`--data_root` (its default without `--data_shards`) or `--data_shards`, and with shards none of the flags that
    need a data set folder; one sentence each."""
    if args.data_shards is None:
        if args.data_root is None:
            args.data_root = DEFAULT_DATA_ROOT
        return
    if args.data_root is not None:
        raise ValueError("--data_root and --data_shards both name the training data; pass one of the two")
    stream = "shards are streamed in an order drawn per epoch, not read by index"
    refusals = [
        (args.buckets, f"--buckets groups a data set folder's items by their sizes before training, and {stream}; "
                       f"train from the folder with --data_root, or drop --buckets"),
        (args.latent_cache is not None, f"--latent_cache serves a data set folder's items by index, and {stream}; "
                                        f"train from the folder with --data_root, or drop --latent_cache"),
        (args.val_items is not None, f"--val_items holds the last items of a data set folder out, and {stream}; "
                                     f"pass a folder of validation items with --val_data_root instead"),
        (args.eval_every_n_steps is not None and args.val_data_root is None,
         f"--eval_every_n_steps with --data_shards needs --val_data_root (a folder of validation items), since "
         f"{stream}"),
        (args.batch_size == MAX_BATCH, f"--batch_size {MAX_BATCH} tries the step on the first item of a data set "
                                       f"folder; with --data_shards pass a number"),
    ]
    refusal = next((sentence for refused, sentence in refusals if refused), None)
    if refusal is not None:
        raise ValueError(refusal)


def build_shard_stream(args: argparse.Namespace) -> ShardStream:
    """The stream of `--data_shards` for `--batch_size` on every device of every node, its shards listed and
    counted now (`shard_list`), so that a missing or empty shard fails before any heavy work."""
    urls, counts = shard_list(args.data_shards)
    world_size = args.devices * args.num_nodes
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**62, ()).item())
    stream = ShardStream(urls, counts, args.batch_size, world_size, seed, resolution=args.resolution,
                         resize=args.resize, crop=args.crop, prompt_dropout=args.prompt_dropout,
                         shuffle_buffer=args.shuffle_buffer, skip_bad_samples=args.skip_bad_samples,
                         max_image_pixels=args.max_image_pixels, caption=args.caption_column)
    if stream.batches_per_rank == 0:
        raise ValueError(f"--batch_size {args.batch_size} on {world_size} device(s) needs at least "
                         f"{args.batch_size * world_size} items and the shards of --data_shards hold {stream.length}; "
                         f"use a smaller batch size")
    rank_zero_info(f"--data_shards: {len(urls)} shards of {stream.length} items, {stream.batches_per_rank} batches "
                   f"per device per epoch; a resumed run restarts at the shard each reader was in (the items of that "
                   f"shard already used are seen again)")
    return stream


def first_item_size(stream: ShardStream) -> tuple[int, int]:
    """(width, height) of the first item of the first shard, decoded as training decodes it (so that a damaged
    first shard fails before any heavy work)."""
    url = stream.urls[0]
    with open_shard(url) as file:
        item = next(shard_items(file, url), None)
    if item is None:
        raise empty_shard(url)
    key, members = item
    _, target, _ = decode_item(url, key, members, stream.max_image_pixels, stream.caption)
    return target.shape[1], target.shape[0]


def check_readers(stream: ShardStream, workers: int) -> None:
    """Every reader (DataLoader worker of every rank) needs a shard of its own."""
    readers = stream.world_size * max(1, workers)
    if len(stream.urls) < readers:
        raise ValueError(f"--data_shards has {len(stream.urls)} shards for {readers} readers ({stream.world_size} "
                         f"device(s) x {max(1, workers)} DataLoader worker(s)), and each reader needs a shard of its "
                         f"own; make smaller shards (tool_make_shards.py --shard_size) or pass fewer --num_workers")
