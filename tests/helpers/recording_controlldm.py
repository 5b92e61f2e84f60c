"""A ControlLDM that records what each training batch holds, for tests of the data order across ranks."""
from __future__ import annotations

import json

from cldm.cldm import ControlLDM


class BatchRecordingControlLDM(ControlLDM):
    """Appends each training batch's rank, prompts and hint size (H, W) to the JSON Lines file `record_path`."""

    def __init__(self, *args, record_path: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.record_path = record_path

    def training_step(self, batch, batch_idx):
        record = {"rank": self.global_rank, "prompts": list(batch["txt"]), "size": list(batch["hint"].shape[1:3])}
        with open(self.record_path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        return super().training_step(batch, batch_idx)
