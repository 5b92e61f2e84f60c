"""Aspect-ratio buckets (`--buckets`): training sizes of about `--resolution` squared pixels, each side a multiple of
64, from 4:1 to 1:4; every item trains at the size whose aspect ratio is nearest its target's (read from the image
header), and every batch holds items of one bucket (`cldm.data.data_order.BucketBatchSampler`).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

# Bucket sides are multiples of this: the VAE downsamples 8x and the UNet three more times.
BUCKET_STEP = 64
# The most elongated bucket: an image longer than this is cropped to it.
MAX_BUCKET_ASPECT = 4.0


def bucket_sizes(resolution: int, step: int = BUCKET_STEP,
                 max_aspect: float = MAX_BUCKET_ASPECT) -> list[tuple[int, int]]:
    """The (width, height) buckets for `resolution`, ordered from the tallest to the widest: for each height, the
    widest multiple of `step` whose area is at most `resolution` squared (and the transposed sizes), with aspect
    ratios up to `max_aspect`."""
    area = resolution * resolution
    widest: dict[int, int] = {}
    for width in range(resolution, int(resolution * max_aspect) + 1, step):
        height = area // width // step * step
        if height >= step and width / height <= max_aspect:
            widest[height] = max(width, widest.get(height, 0))
    landscape = {(width, height) for height, width in widest.items()}
    return sorted(landscape | {(height, width) for width, height in landscape}, key=lambda size: size[0] / size[1])


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """The index of the bucket whose aspect ratio is nearest (in log scale) that of the (width, height) `size`; the
    first of equally near ones."""
    aspect = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda bucket: abs(math.log(buckets[bucket][0] / buckets[bucket][1]) - aspect))


def assign_buckets(sizes: Sequence[tuple[int, int]], buckets: Sequence[tuple[int, int]]) -> list[int]:
    """The bucket of each (width, height) size."""
    return [nearest_bucket(size, buckets) for size in sizes]


def bucket_histogram(assignment: Sequence[int], buckets: Sequence[tuple[int, int]]) -> str:
    """'WxH: N' for each bucket that holds items, in bucket order, e.g. '448x576: 3, 512x512: 10'."""
    counts = Counter(assignment)
    return ", ".join(f"{buckets[bucket][0]}x{buckets[bucket][1]}: {counts[bucket]}" for bucket in sorted(counts))
