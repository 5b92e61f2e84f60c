"""Training from WebDataset shards (`--data_shards`): `.tar` files of `{key}.<ext>` (the target), `{key}.hint.<ext>`
and `{key}.txt` or `{key}.json` (the caption), streamed with the `webdataset` library.

Each epoch visits the shards in an order drawn from (seed, epoch); `wds.split_by_node` gives rank r of R the shards
r, r + R, ... of that order and `wds.split_by_worker` splits a rank's shards between its DataLoader workers, so no
two readers share a shard. A reader streams its shards front to back (`wds.gopen`: local paths, `pipe:` commands,
object-store URLs), passes the items through a shuffle buffer seeded by (seed, epoch, rank, worker) and decodes and
frames them as `MyDataset` does (`cldm.data.shards.decode_item`, `cldm.data.geometry.frame`); prompt dropout and
random crops draw from (seed, epoch, key), the key's number for the keys tool_make_shards.py writes (the item's
index, so the draws are `MyDataset`'s for the same item).

Every rank serves the same number of batches per epoch (DDP needs it): `count // (ranks * batch_size)` whole
batches, dealt to its workers as the DataLoader takes them, one batch per worker in turn. A reader whose shards hold
fewer items than its share starts its shards again; one whose shards hold more leaves the rest for later epochs. A
reader whose shards hold no good item at all (every one skipped by `--skip_bad_samples`) stops with a ValueError
instead of ending its epoch early, which would leave the other ranks waiting.

Resuming is at shard granularity: each reader skips the shards it had read through before the checkpoint (from the
count of batches done) and starts afresh at the next one, so the items of that partly read shard which were already
used are seen again, and the items of the skipped shards that were still in the shuffle buffer are not seen in that
epoch.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import random
import re
import zlib
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import numpy as np
import pytorch_lightning as pl
import webdataset as wds
from pytorch_lightning.callbacks import Callback
from torch.utils.data import IterableDataset
from webdataset.gopen import gopen_schemes

from cldm.data.dataset import CROP_STREAM, hint_array, target_array
from cldm.data.geometry import frame
from cldm.data.images import DEFAULT_MAX_IMAGE_PIXELS
from cldm.data.shards import FORMAT_NAME, MANIFEST_NAME, decode_item, shard_items

DEFAULT_SHUFFLE_BUFFER = 1000

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The shard list
# ---------------------------------------------------------------------------------------------

def _is_url(text: str) -> bool:
    """Whether `text` is something `wds.gopen` opens other than a local path (`pipe:...`, `s3://...`)."""
    scheme, colon, _ = text.partition(":")
    return bool(colon) and len(scheme) > 1 and scheme.isidentifier()


def shard_list(specs: Sequence[str]) -> tuple[list[str], list[int]]:
    """The shards of `--data_shards` and the items of each. A spec is a folder with shards.json (its shards, whose
    names may also be URLs, and their counts), a `.tar` path, a brace pattern (`shard-{000000..000009}.tar`) or a
    URL; local shards must exist. A shard that no shards.json counts (one listing it, or the one beside it) is read
    once to count its items."""
    listed: list[tuple[str, int | None]] = []
    for spec in specs:
        if not _is_url(spec) and os.path.isdir(spec):
            listed += _manifest_shards(spec).items()
        else:
            listed += [(url, None) for url in wds.shardlists.expand_urls(spec)]
    urls = [url for url, _ in listed]
    _check_shards(urls)
    beside: dict[str, dict[str, int]] = {}  # folder -> the counts of its shards.json (none without one)
    for url in {url for url, count in listed if count is None and not _is_url(url)}:
        folder = os.path.dirname(url)
        if folder not in beside:
            beside[folder] = _manifest_shards(folder) if os.path.isfile(os.path.join(folder, MANIFEST_NAME)) else {}
    counts = [count if count is not None else beside.get(os.path.dirname(url), {}).get(url) for url, count in listed]
    counts = [_count_items(url) if count is None else count for url, count in zip(urls, counts)]
    if 0 in counts:
        raise empty_shard(urls[counts.index(0)])
    return urls, counts


def empty_shard(url: str) -> ValueError:
    """The error of a shard that holds no items."""
    return ValueError(f"Shard {url} holds no items; leave it out of --data_shards or remake the shards with "
                      f"tool_make_shards.py.")


def _check_shards(urls: Sequence[str]) -> None:
    """Some shards, all local ones existing, every URL of a scheme webdataset opens."""
    if not urls:
        raise ValueError("--data_shards names no shards; pass .tar files, a brace pattern or the folder that "
                         "tool_make_shards.py wrote.")
    schemes = sorted({*gopen_schemes} - {"__default__"} | {"file"})
    unknown = [url for url in urls if _is_url(url) and url.partition(":")[0] not in schemes]
    if unknown:
        raise ValueError(f"--data_shards: webdataset opens no {unknown[0].partition(':')[0]}: URLs ({unknown[0]}); "
                         f"use one of {', '.join(f'{scheme}:' for scheme in schemes)}, e.g. 'pipe:aws s3 cp "
                         f"s3://bucket/shard-000000.tar -'.")
    missing = [url for url in urls if not _is_url(url) and not os.path.isfile(url)]
    if missing:
        raise FileNotFoundError(f"--data_shards: {len(missing)} of the {len(urls)} shards do not exist (the first is "
                                f"{missing[0]}); check the paths or remake them with tool_make_shards.py.")


def _manifest_shards(folder: str) -> dict[str, int]:
    """{path or URL: items} of the shards that the shards.json of `folder` lists (tool_make_shards.py's: every shard
    holds `shard_size` items but the last)."""
    manifest = _manifest(folder, "--data_shards")
    size, count = manifest["shard_size"], manifest["count"]
    return {name if _is_url(name) else os.path.join(folder, name): min(size, count - number * size)
            for number, name in enumerate(manifest["shards"])}


def _manifest(folder: str, flag: str) -> dict:
    """The shards.json of a shard folder, checked to be one that tool_make_shards.py writes."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: the folder {folder} has no {MANIFEST_NAME}; pass the folder that "
                                f"tool_make_shards.py wrote, or the .tar files themselves.")
    try:
        with open(path, encoding="utf-8") as file:
            manifest = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    fields = {"format": str, "count": int, "shard_size": int, "shards": list}
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME or \
            not all(isinstance(manifest.get(name), kind) for name, kind in fields.items()):
        raise ValueError(f"{flag}: {path} is not the shard list tool_make_shards.py writes (a JSON object with the "
                         f"format {FORMAT_NAME!r} and the fields {', '.join(fields)}); remake the folder with "
                         f"tool_make_shards.py, or pass the .tar files themselves.")
    return manifest


def _count_items(url: str) -> int:
    """The items of the shard `url`, read once."""
    with open_shard(url) as stream:
        return sum(1 for _ in shard_items(stream, url))


@contextlib.contextmanager
def open_shard(url: str) -> Iterator[BinaryIO]:
    """`wds.gopen(url)`, where a `pipe:` command or a download that fails (webdataset's OSError with the command's
    exit status) is a ValueError naming the shard."""
    try:
        with wds.gopen(url) as stream:
            yield stream
    except OSError as error:
        status = re.search(r": exit (-?\d+) \(read\)", str(error))
        if status is None:
            raise
        raise ValueError(f"Shard {url} could not be read: the command that streams it exited with status "
                         f"{status.group(1)}; run it in a shell to see why, or check the URL.") from None


# ---------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------

class ShardStream(IterableDataset):
    """The items of the shards `urls` as `dict(jpg=target in [-1, 1], txt=prompt, hint=hint in [0, 1])`, as
    `MyDataset` gives them, split between ranks and DataLoader workers; each rank serves `batches_per_rank` batches
    of `batch_size` per epoch. It has the sampler's resume interface (`seed`, `length`, `resume`), so that
    `DataOrderCheckpoint` saves its position; `ShardEpochs` tells it the epoch.

    Args:
        urls: the shards (`shard_list`).
        counts: the items of each shard (`shard_list`).
        batch_size: items per batch on each rank.
        world_size: the number of ranks.
        seed: base seed of the shard orders, the shuffle buffers and the per-item draws.
        resolution, resize, crop, prompt_dropout, max_image_pixels: as `MyDataset`'s.
        shuffle_buffer: items each reader shuffles among (1: none).
        skip_bad_samples: skip an undecodable item or a damaged shard with a warning instead of stopping.
        caption: the field of a `{key}.json` caption.
    """

    def __init__(self, urls: Sequence[str], counts: Sequence[int], batch_size: int, world_size: int, seed: int,
                 resolution: int | None = None, resize: str = "crop", crop: str = "center",
                 prompt_dropout: float = 0.0, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 skip_bad_samples: bool = False, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 caption: str = "text") -> None:
        super().__init__()
        self.urls, self.counts = list(urls), list(counts)
        self.batch_size = batch_size
        self.world_size = world_size
        self.batches_per_rank = sum(self.counts) // (world_size * batch_size)
        self.seed = seed
        self.resolution, self.resize, self.crop = resolution, resize, crop
        self.prompt_dropout = prompt_dropout
        self.shuffle_buffer = shuffle_buffer
        self.skip_bad_samples = skip_bad_samples
        self.max_image_pixels = max_image_pixels
        self.caption = caption
        self.epoch = 0
        self.start = 0  # batches of this rank of the current epoch to leave out, once (set when resuming)

    @property
    def length(self) -> int:
        """The number of items in the shards."""
        return sum(self.counts)

    def set_epoch(self, epoch: int) -> None:
        """Called by `ShardEpochs` before each epoch."""
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def resume(self, seed: int, epoch: int, samples_done: int) -> None:
        """Continue after the first `samples_done` items (of all ranks) of `epoch`, at shard granularity."""
        self.seed = seed
        self.epoch, self.start = epoch, samples_done // (self.batch_size * self.world_size)
        if self.start >= self.batches_per_rank:
            self.epoch, self.start = epoch + 1, 0

    def epoch_order(self) -> list[int]:
        """The current epoch's order of the shards, as indices into `urls`."""
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.urls)).tolist()

    def __iter__(self) -> Iterator[dict[str, np.ndarray | str]]:
        rank, _, worker, workers = wds.utils.pytorch_worker_info()
        start, self.start = self.start, 0
        mine = list(wds.split_by_worker(wds.split_by_node(self.epoch_order())))
        batches = _dealt(self.batches_per_rank, workers, worker)
        done = _dealt(start, workers, worker) * self.batch_size
        share = batches * self.batch_size - done
        return self._served(itertools.islice(self._rounds(mine, done, [rank, worker]), share), share, rank, worker)

    def _served(self, samples: Iterator[dict[str, np.ndarray | str]], share: int, rank: int,
                worker: int) -> Iterator[dict[str, np.ndarray | str]]:
        """`samples`, then a ValueError if they were fewer than the reader's `share`: a rank that ended its epoch
        early would leave the other ranks of DDP waiting for it (a rank that stops with the error makes them stop too,
        as with any rank's error)."""
        served = 0
        for sample in samples:
            served += 1
            yield sample
        if served < share:
            raise ValueError(f"--skip_bad_samples skipped every item of the shards that rank {rank} (DataLoader "
                             f"worker {worker}) reads, which leaves it {share - served} items short of its {share} "
                             f"for the epoch, and every rank must serve the same batches; remake the damaged shards "
                             f"with tool_make_shards.py or leave them out of --data_shards")

    def _rounds(self, shards: list[int], items_done: int, reader: list[int]) -> Iterator[dict[str, np.ndarray | str]]:
        """The decoded items of `shards`, round after round, each round through its own shuffle buffer (seeded by the
        epoch, the `reader` and the round); the first round leaves out the shards whose items all lie within the
        first `items_done`. Bad items skipped by `skip_bad_samples` are left out; ends when a later round yields no
        item (no shard, or only bad items)."""
        for round_number in itertools.count():
            unread = _unread(shards, [self.counts[index] for index in shards], items_done) if round_number == 0 \
                else shards
            seed = np.random.SeedSequence([self.seed, self.epoch, *reader, round_number]).generate_state(1)[0]
            shuffle = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(int(seed)))
            yielded = False
            for sample in filter(None, (self._sample(*item) for item in shuffle(self._raw_items(unread)))):
                yielded = True
                yield sample
            if not yielded and round_number > 0:
                return

    def _raw_items(self, shards: Sequence[int]) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """(shard url, key, members) of the items of `shards`, in order; a damaged shard is skipped or stops."""
        for index in shards:
            url = self.urls[index]
            try:
                with open_shard(url) as stream:
                    for key, members in shard_items(stream, url):
                        yield url, key, members
            except ValueError as error:
                if not self.skip_bad_samples:
                    raise
                logger.warning(f"--skip_bad_samples: skipping the rest of the shard: {error}")

    def _sample(self, url: str, key: str, members: dict[str, bytes]) -> dict[str, np.ndarray | str] | None:
        """One item, decoded and framed; None for a bad item skipped by `skip_bad_samples`."""
        try:
            source, target, prompt = decode_item(url, key, members, self.max_image_pixels, self.caption)
        except ValueError as error:
            if not self.skip_bad_samples:
                raise
            logger.warning(f"--skip_bad_samples: skipping the item: {error}")
            return None
        visit = [self.seed, self.epoch, int(key) if key.isdigit() else zlib.crc32(key.encode("utf-8"))]
        if self.resolution is not None:
            rng = np.random.default_rng([*visit, CROP_STREAM]) if self.crop == "random" else None
            source, target = frame([source, target], (self.resolution, self.resolution), self.resize, rng)
        if self.prompt_dropout > 0 and np.random.default_rng(visit).random() < self.prompt_dropout:
            prompt = ""
        return dict(jpg=target_array(target), txt=prompt, hint=hint_array(source))


def _dealt(batches: int, workers: int, worker: int) -> int:
    """How many of the first `batches` batches of a rank the DataLoader takes from `worker` (one per worker in
    turn)."""
    return batches // workers + (worker < batches % workers)


def _unread(shards: list[int], counts: Sequence[int], items_done: int) -> list[int]:
    """`shards` less the leading ones whose items (`counts`) all lie within the first `items_done` (counted round
    after round)."""
    items_done %= max(1, sum(counts))
    for position, count in enumerate(counts):
        if count > items_done:
            return shards[position:]
        items_done -= count
    return []


class ShardEpochs(Callback):
    """Tells a `ShardStream` the epoch before its workers start (Lightning tells only samplers)."""

    def __init__(self, stream: ShardStream) -> None:
        super().__init__()
        self.stream = stream

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stream.set_epoch(trainer.current_epoch)
