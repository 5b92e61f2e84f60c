"""Resuming a run with other settings: the run's batch size, seed, precision, learning rate, `--sd_locked`, image
framing (`--resize`, `--crop`, `--buckets`) and data set are saved in its checkpoints (`RunSettings`), and a run resumed with other ones says, before any heavy work, what
changed and what it does about it, or why it cannot continue (`check_resumed_settings`)."""
from __future__ import annotations

import argparse
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn

from cldm.data.layouts import index_path
from cldm.training.batch_probe import MAX_BATCH
from ldm.checkpoint import read_checkpoint


def run_settings(args: argparse.Namespace, items: int) -> dict[str, Any]:
    """What a resumed run compares: the flags that shape training, and the data set's identity (its item count and
    the SHA-256 of its prompt.json or metadata.jsonl, or of the `--data_shards` list)."""
    identity = ("\n".join(args.data_shards).encode() if args.data_shards is not None
                else Path(index_path(args.data_root)).read_bytes())
    return {"batch_size": args.batch_size, "seed": args.seed, "precision": args.precision,
            "learning_rate": args.learning_rate, "sd_locked": args.sd_locked, "resize": args.resize, "crop": args.crop,
            "buckets": args.buckets, "items": items, "prompt_json_sha256": hashlib.sha256(identity).hexdigest()}


class RunSettings(Callback):
    """Saves `run_settings` in checkpoints; a resumed run compares them in `check_resumed_settings`, before the
    checkpoint is restored, so restoring them does nothing."""

    def __init__(self, settings: Mapping[str, Any]):
        super().__init__()
        self.settings = dict(settings)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.settings)


def _changes(saved: Mapping[str, Any], now: Mapping[str, Any], checkpoint: str) -> list[str]:
    """One sentence per setting of `now` that differs from `saved`, saying what the resumed run does."""
    run = f"the run in {checkpoint}"
    changes = []
    if now["batch_size"] not in (saved["batch_size"], MAX_BATCH):  # `max` is compared once it is measured
        changes.append(f"--batch_size {now['batch_size']} differs from the batch size {saved['batch_size']} of {run}; "
                       f"the data order continues from the same sample, in batches of {now['batch_size']}")
    if now["seed"] not in (saved["seed"], None):  # without --seed the checkpoint's streams continue, as asked
        seed = "the random seed" if saved["seed"] is None else f"the seed {saved['seed']}"
        changes.append(f"--seed {now['seed']} differs from {seed} of {run}; the run continues the checkpoint's random "
                       f"streams and data order, so --seed {now['seed']} is not used")
    if saved["precision"] != now["precision"]:
        changes.append(f"--precision {now['precision']} differs from the precision {saved['precision']} of {run}; "
                       f"training continues in {now['precision']}")
    if saved["learning_rate"] != now["learning_rate"]:
        changes.append(f"--learning_rate {now['learning_rate']} differs from the learning rate "
                       f"{saved['learning_rate']} of {run}; the optimizer state restores {saved['learning_rate']}, so "
                       f"--learning_rate {now['learning_rate']} is not used")
    framing = [f"--{name} {now[name]}" for name in ("resize", "crop") if saved.get(name, now[name]) != now[name]]
    if framing:
        changes.append(f"{' and '.join(framing)} {'differs' if len(framing) == 1 else 'differ'} from the framing --resize {saved['resize']} --crop "
                       f"{saved['crop']} of {run}; the images are framed by {' and '.join(framing)} from here on")
    if saved["prompt_json_sha256"] != now["prompt_json_sha256"]:
        items = (f"still {now['items']} items" if now["items"] == saved["items"]
                 else f"{now['items']} items, was {saved['items']}")
        changes.append(f"the data set's prompt.json differs from that of {run} ({items}); the run continues the epoch "
                       f"from the same position in the new data set's order")
    return changes


def check_resumed_settings(args: argparse.Namespace, settings: Mapping[str, Any]) -> None:
    """Warn, one sentence each, about the settings of this run (`settings`, from `run_settings`) that differ from
    those saved in `--resume_from_checkpoint`, and refuse another `--sd_locked`, whose trainable weights do not fit
    the optimizer state, and another `--buckets`, whose data order counts otherwise; a checkpoint without settings
    (an older run's) is not compared, nor a setting it does not hold."""
    if args.resume_from_checkpoint is None:
        return
    checkpoint = read_checkpoint(args.resume_from_checkpoint, mmap=True)
    saved = checkpoint.get("callbacks", {}).get(RunSettings.__qualname__)
    if saved is None:
        return
    if saved["sd_locked"] != settings["sd_locked"]:
        flag, then = ("--no-sd_locked", "--sd_locked") if saved["sd_locked"] else ("--sd_locked", "--no-sd_locked")
        raise ValueError(f"{flag} trains other weights than the run in {args.resume_from_checkpoint}, which trained "
                         f"with {then}, so its optimizer state does not fit; resume with {then}, or start a new run "
                         f"from its weights with --resume_path {args.resume_from_checkpoint}")
    if saved.get("buckets", settings["buckets"]) != settings["buckets"]:
        flag, then = ("--buckets", "without --buckets") if settings["buckets"] else ("no --buckets", "with --buckets")
        raise ValueError(f"{flag}: the run in {args.resume_from_checkpoint} trained {then}, and its position in the "
                         f"data order counts {'samples' if settings['buckets'] else 'bucket batches'}, which this run "
                         f"cannot continue from; resume {then}, or start a new run from its weights with --resume_path "
                         f"{args.resume_from_checkpoint}")
    for change in _changes(saved, settings, args.resume_from_checkpoint):
        rank_zero_warn(change)
