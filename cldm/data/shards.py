"""WebDataset shards of a data set folder: `.tar` files that hold each item's original image bytes and caption.

An item with index i has the key `f"{i:09d}"` and three members: `{key}.<ext>` (the target image),
`{key}.hint.<ext>` (the hint, the Fill50K `source`) and `{key}.txt` (the prompt, UTF-8), `<ext>` being the image
file's own extension, lowercased. Shards are named `shard-000000.tar`, ... and hold `shard_size` items each (the
last one fewer). Beside them `shards.json` records the format, the item count, the shard names and the layout of
the folder they were made from. The whole folder is written under a temporary name and renamed when complete.
`read_shard_samples` reads the items back as `MyDataset` gives them at its defaults; `shard_items` and
`decode_item` read and decode any tar stream of this format (`cldm.data.shard_stream` streams them for training).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import cv2
import numpy as np

from cldm.checkpoints.atomic import atomic_path, atomic_write
from cldm.checkpoints.paths import check_output_path
from cldm.data.dataset import check_same_aspect_ratio, hint_array, target_array
from cldm.data.geometry import resize
from cldm.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS, TooManyPixelsError, UnreadableImageError, decode_color, image_error,
)
from cldm.data.layouts import FILL50K_INDEX, IMAGE_KEYS, Columns, index_path, read_records
from ldm.checkpoint import PathLike

MANIFEST_NAME = "shards.json"
FORMAT_NAME = "controlnet-webdataset-shards"
MEMBER_SUFFIXES = {"target": "", "source": ".hint"}  # the record key -> what follows the item key in a member name


def item_key(index: int) -> str:
    """The WebDataset key of item `index`."""
    return f"{index:09d}"


def shard_name(number: int) -> str:
    """The file name of shard `number`."""
    return f"shard-{number:06d}.tar"


def item_members(root: str, record: dict[str, str], key: str, where: str) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of one record: its target, its hint and its prompt; `where` names the item in errors."""
    for record_key in IMAGE_KEYS:
        path = os.path.join(root, record[record_key])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where} names the {record_key} image {record[record_key]!r}, which does not "
                                    f"exist; restore the file or remove the item.")
        extension = os.path.splitext(path)[1].lower() or ".png"
        with open(path, "rb") as file:
            yield f"{key}{MEMBER_SUFFIXES[record_key]}{extension}", file.read()
    yield f"{key}.txt", record["prompt"].encode("utf-8")


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add `data` as a regular file with fixed metadata, so that the same folder gives the same bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def make_shards(data_root: str, out: PathLike, shard_size: int, overwrite: bool = False,
                columns: Columns = Columns()) -> dict:
    """Write the items of the data set folder `data_root` (either layout) as shards into the folder `out`.

    Args:
        shard_size: items per shard.
        overwrite: replace an existing shard folder at `out` (never a folder that is not one).
    Returns:
        the manifest written to `out/shards.json`.
    """
    if shard_size <= 0:
        raise ValueError(f"--shard_size must be a positive number of items, got {shard_size}")
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"Data set folder {data_root} does not exist or is not a folder; pass the folder "
                                f"that holds prompt.json or metadata.jsonl.")
    check_output_path(out, overwrite=overwrite, folder=True, marker=MANIFEST_NAME, kind="shard folder",
                      marker_fields={"format": FORMAT_NAME})
    index = index_path(data_root)
    records = read_records(index, columns)
    starts = range(0, len(records), shard_size)
    with atomic_path(out, folder=True) as folder:
        for number, start in enumerate(starts):
            with atomic_write(folder / shard_name(number)) as file, tarfile.open(fileobj=file, mode="w") as archive:
                for index_in_set in range(start, min(start + shard_size, len(records))):
                    where = f"Item {index_in_set + 1} of {index}"
                    for name, data in item_members(data_root, records[index_in_set], item_key(index_in_set), where):
                        _add_member(archive, name, data)
        manifest = {"format": FORMAT_NAME, "count": len(records), "shard_size": shard_size,
                    "shards": [shard_name(number) for number in range(len(starts))],
                    "layout": "fill50k" if os.path.basename(index) == FILL50K_INDEX else "image-folder",
                    "members": "{key}.<ext> target image, {key}.hint.<ext> hint, {key}.txt prompt (UTF-8); original "
                               "bytes"}
        with atomic_write(folder / MANIFEST_NAME, "w") as file:
            json.dump(manifest, file, indent=1)
    return manifest



def read_shard_samples(paths: Sequence[PathLike], max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                       caption: str = "text") -> Iterator[dict[str, np.ndarray | str]]:
    """The items of the shards `paths`, in order, as `dict(jpg=target in [-1, 1], txt=prompt, hint=hint in [0, 1])`:
    what `MyDataset` gives for the same items at its defaults (images at their own size, a hint of another size
    resized to its target's, no prompt dropout). A truncated shard or an item without a member is one sentence that
    names the shard and the key; `caption` is the field of a `{key}.json` caption."""
    if not paths:
        raise ValueError("The shard list is empty; pass the .tar files that tool_make_shards.py wrote.")
    for path in paths:
        with open(path, "rb") as file:
            for key, members in shard_items(file, os.fspath(path)):
                source, target, prompt = decode_item(os.fspath(path), key, members, max_image_pixels, caption)
                yield dict(jpg=target_array(target), txt=prompt, hint=hint_array(source))


class _CountingReader(io.RawIOBase):
    """A readable stream that counts the bytes read through it."""

    def __init__(self, stream: BinaryIO) -> None:
        super().__init__()
        self.stream = stream
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[:len(data)] = data
        self.count += len(data)
        return len(data)


def shard_items(stream: BinaryIO, name: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {member name after the key: bytes}) of each item of the tar stream `stream` (the shard `name`), read
    front to back; an item's members are adjacent. A truncated or damaged shard is one sentence naming it."""
    truncated = f"Shard {name} is truncated or damaged"
    reader = _CountingReader(stream)
    try:
        archive = tarfile.open(fileobj=reader, mode="r|")
    except tarfile.ReadError:
        raise ValueError(f"{truncated}: it is not a tar file; remake it with tool_make_shards.py.") from None
    with archive:
        key, members = None, {}
        while True:
            try:
                info = archive.next()
            except tarfile.ReadError:
                raise ValueError(f"{truncated} after the key {key}; remake it with tool_make_shards.py.") from None
            if info is None:
                break
            if not info.isfile():
                continue
            member_key, _, suffix = info.name.partition(".")
            if member_key != key and key is not None:
                yield key, members
                members = {}
            key = member_key
            try:
                members[suffix] = archive.extractfile(info).read()
            except (tarfile.ReadError, EOFError):
                raise ValueError(f"{truncated} in the member {info.name}; remake it with "
                                 f"tool_make_shards.py.") from None
        while reader.read(1 << 16):  # the end-of-archive blocks and the record's padding
            pass
        if reader.count < archive.offset + 2 * tarfile.BLOCKSIZE:  # no end-of-archive blocks: cut short
            raise ValueError(f"{truncated} after the key {key}; remake it with tool_make_shards.py.")
        if key is not None:
            yield key, members


def decode_item(name: str, key: str, members: dict[str, bytes], max_image_pixels: int,
                caption: str = "text") -> tuple[np.ndarray, np.ndarray, str]:
    """(hint, target, prompt) of one item of the shard `name` from its members: the images uint8 RGB as `MyDataset`
    reads files, the hint resized to the target's size; the prompt from `{key}.txt`, or the field `caption` of
    `{key}.json`."""
    prompt_member = "txt" if "txt" in members else "json" if "json" in members else None
    names = {"target": next((member for member in members
                             if member not in ("txt", "json") and not member.startswith("hint.")), None),
             "source": next((member for member in members if member.startswith("hint.")), None),
             "prompt": prompt_member}
    for record_key, member in (("source", "a {key}.hint.<ext>"), ("target", "a {key}.<ext>"),
                               ("prompt", "{key}.txt")):
        if names[record_key] is None:
            raise ValueError(f"Shard {name} has no {record_key} member ({member.format(key=key)}) for the key {key} "
                             f"(it holds {', '.join(f'{key}.{member}' for member in members)}); remake it with "
                             f"tool_make_shards.py.")
    source, target = (_decode(name, f"{key}.{names[record_key]}", members[names[record_key]], max_image_pixels)
                      for record_key in IMAGE_KEYS)
    check_same_aspect_ratio({"source": f"{key}.{names['source']}", "target": f"{key}.{names['target']}"},
                            source.shape[1::-1], target.shape[1::-1])
    return resize(source, target.shape[1::-1]), target, _prompt(name, key, prompt_member, members[prompt_member],
                                                                caption)


def _prompt(name: str, key: str, member: str, data: bytes, caption: str) -> str:
    """The prompt of `{key}.txt` (the text) or `{key}.json` (its field `caption`)."""
    where = f"Member {key}.{member} of shard {name}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not UTF-8 text; save the prompt as UTF-8.") from None
    if member == "txt":
        return text
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON ({error.msg}); write the caption as a JSON object.") from None
    if not isinstance(fields, dict) or not isinstance(fields.get(caption), str):
        raise ValueError(f"{where} has no text field {caption!r}; name the caption field with --caption_column.")
    return fields[caption]


def _decode(name: str, member: str, data: bytes, max_image_pixels: int) -> np.ndarray:
    """The member `member` of shard `name` as uint8 RGB; an unreadable or too large image becomes one sentence."""
    where = f"Member {member} of shard {name}"
    try:
        return cv2.cvtColor(decode_color(data, where, max_image_pixels), cv2.COLOR_BGR2RGB)
    except (UnreadableImageError, TooManyPixelsError) as error:
        raise image_error(where, error) from None
