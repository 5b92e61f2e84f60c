"""The layouts a data set folder (`--data_root`) may have, and the records `MyDataset` reads from either.

- **Fill50K** (the tutorial's): `prompt.json`, JSON Lines of `{"source", "target", "prompt"}`.
- **Image folder** (what diffusers' `train_controlnet.py --train_data_dir` reads through Hugging Face's
  `imagefolder`): `metadata.jsonl`, JSON Lines whose columns give the target image, the conditioning image (the
  hint) and the caption. The column names are flags with diffusers' defaults (`--image_column image`,
  `--conditioning_image_column conditioning_image`, `--caption_column text`). As in `imagefolder`, an image column
  `c` may also be spelled `c_file_name`, and the `image` column `file_name`.

A folder holds one of the two files; a folder with both is refused. Either way a record is
`{"source": hint, "target": image, "prompt": caption}`, image paths relative to the folder: they must stay inside
it once symlinks are resolved. Errors name the file and the line.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from cldm import flags

FILL50K_INDEX = "prompt.json"
IMAGE_FOLDER_INDEX = "metadata.jsonl"
REQUIRED_KEYS = ("source", "target", "prompt")
IMAGE_KEYS = ("source", "target")
OUTSIDE_FIX = ("which is outside the data set folder; give a path inside it (relative, with no '..' or symlink "
               "leading out).")


@dataclass(frozen=True)
class Columns:
    """The `metadata.jsonl` columns of an image-folder data set; the defaults are diffusers'."""

    image: str = "image"
    conditioning_image: str = "conditioning_image"
    caption: str = "text"

    def fields(self) -> list[tuple[str, str, str]]:
        """(record key, column, the flag that names the column) of the hint, the target and the caption."""
        return [("source", self.conditioning_image, "--conditioning_image_column"),
                ("target", self.image, "--image_column"), ("prompt", self.caption, "--caption_column")]


def add_column_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add --image_column, --conditioning_image_column and --caption_column (and their hyphenated spellings)."""
    for field, what in (("image", "target image"), ("conditioning_image", "conditioning image (the hint)"),
                        ("caption", "caption")):
        name = f"{field}_column"
        parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, type=flags.column_name,
                            default=getattr(Columns(), field),
                            help=f"the metadata.jsonl column of the {what} (image-folder layout)")


def columns_from(args: argparse.Namespace) -> Columns:
    """The `Columns` the flags of `add_column_flags` name."""
    return Columns(args.image_column, args.conditioning_image_column, args.caption_column)


def index_path(root: str) -> str:
    """The file that lists the items of the data set folder `root`: its prompt.json or its metadata.jsonl."""
    present = [name for name in (FILL50K_INDEX, IMAGE_FOLDER_INDEX) if os.path.isfile(os.path.join(root, name))]
    if len(present) == 2:
        raise ValueError(f"Data set folder {root} holds both prompt.json (Fill50K layout) and metadata.jsonl "
                         f"(image-folder layout); keep the one that lists your items and move the other away.")
    if not present:
        raise FileNotFoundError(f"{os.path.join(root, FILL50K_INDEX)} does not exist; the data set folder must hold "
                                f"a prompt.json (Fill50K layout) or a metadata.jsonl (image-folder layout).")
    return os.path.join(root, present[0])


def read_records(path: str, columns: Columns = Columns()) -> list[dict[str, str]]:
    """The records of the index file `path` (what `index_path` returns); `columns` apply to a metadata.jsonl."""
    if os.path.basename(path) == IMAGE_FOLDER_INDEX:
        return read_metadata_file(path, columns)
    if columns != Columns():
        raise ValueError(f"--image_column, --conditioning_image_column and --caption_column name the columns of a "
                         f"metadata.jsonl, but {os.path.dirname(path) or '.'} has the Fill50K layout ({path}); leave "
                         f"those flags out.")
    return read_prompt_file(path)


def read_prompt_file(path: str) -> list[dict[str, str]]:
    """The records of a Fill50K prompt.json, blank lines skipped; errors name the line number.

    Image paths must stay inside the prompt file's folder once symlinks are resolved: an absolute path, a `..` that
    leaves the folder or a symlink pointing out of it is refused.
    """
    folder = _InsideFolder(os.path.dirname(path) or ".")
    records = [_fill50k_record(line, number, path, folder)
               for number, line in _json_lines(path, f"keys {', '.join(REQUIRED_KEYS)}")]
    if not records:
        raise ValueError(f"{path} lists no items; add one JSON object per line with keys {', '.join(REQUIRED_KEYS)}.")
    return records


def read_metadata_file(path: str, columns: Columns = Columns()) -> list[dict[str, str]]:
    """The records of an image-folder metadata.jsonl, blank lines skipped; errors name the line number. Every image
    must exist and stay inside the file's folder, as for `read_prompt_file`."""
    folder = _InsideFolder(os.path.dirname(path) or ".")
    names = f"columns {', '.join(column for _, column, _ in columns.fields())}"
    records = [_image_folder_record(line, number, path, folder, columns) for number, line in _json_lines(path, names)]
    if not records:
        raise ValueError(f"{path} lists no items; add one JSON object per line with {names}.")
    return records


def _json_lines(path: str, expected: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; `expected` says what an object holds, for the message."""
    with open(path, "rb") as file:
        raw_lines = file.read().splitlines()
    for number, raw in enumerate(raw_lines, start=1):
        if raw.strip():
            yield number, _json_object(raw, number, path, expected)


def _json_object(raw: bytes, number: int, path: str, expected: str) -> dict:
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError:
        raise ValueError(f"Line {number} of {path} is not UTF-8 text; save the file as UTF-8.") from None
    try:
        line = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"Line {number} of {path} is not valid JSON ({error.msg}).") from None
    if not isinstance(line, dict):
        raise ValueError(f"Line {number} of {path} is not a JSON object with {expected}.")
    return line


def _fill50k_record(line: dict, number: int, path: str, folder: _InsideFolder) -> dict[str, str]:
    for key in REQUIRED_KEYS:
        if not isinstance(line.get(key), str):
            raise ValueError(f"Line {number} of {path} lacks the text key {key!r}.")
    for key in IMAGE_KEYS:
        if not folder.holds(line[key]):
            raise ValueError(f"Line {number} of {path} gives the {key} image {line[key]!r}, {OUTSIDE_FIX}")
    return line


def _image_folder_record(line: dict, number: int, path: str, folder: _InsideFolder,
                         columns: Columns) -> dict[str, str]:
    record = {}
    for key, column, flag in columns.fields():
        value = next((line[name] for name in _spellings(column, key in IMAGE_KEYS) if name in line), None)
        if not isinstance(value, str):
            raise ValueError(f"Line {number} of {path} has no text column {column!r} (its columns: "
                             f"{', '.join(line) or 'none'}); add it, or name the column to read with {flag}.")
        record[key] = value
        if key in IMAGE_KEYS:
            _check_image(value, f"Line {number} of {path} gives the {column} {value!r}", folder)
    return record


def _spellings(column: str, is_image: bool) -> list[str]:
    """The names a column may have in a line: an image column also as `imagefolder` spells it."""
    if not is_image:
        return [column]
    return [column, f"{column}_file_name"] + (["file_name"] if column == "image" else [])


def _check_image(relative_path: str, where: str, folder: _InsideFolder) -> None:
    """Refuse an image path that leaves the folder or names no file; `where` starts the message."""
    if not folder.holds(relative_path):
        raise ValueError(f"{where}, {OUTSIDE_FIX}")
    if not os.path.isfile(os.path.join(folder.root, relative_path)):
        raise FileNotFoundError(f"{where}, which does not exist; restore the file or remove the line.")


class _InsideFolder:
    """Whether relative paths resolve (symlinks followed) to a place inside a folder; each subfolder is resolved
    once, so a prompt file of 50,000 items costs one `lstat` per image."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self._prefix = os.path.join(self.root, "")
        self._resolved: dict[str, str] = {}

    def holds(self, relative_path: str) -> bool:
        if os.path.isabs(relative_path) or "\0" in relative_path:
            return False
        parent, name = os.path.split(os.path.join(self.root, relative_path))
        if parent not in self._resolved:
            self._resolved[parent] = os.path.realpath(parent)
        resolved = os.path.join(self._resolved[parent], name)
        if name in ("", ".", "..") or os.path.islink(resolved):
            resolved = os.path.realpath(resolved)
        return resolved == self.root or resolved.startswith(self._prefix)
