"""The DDIM sampler as the original's gradio apps use it: classifier-free guidance in two passes.

Running the conditional and unconditional passes one after the other lets the unconditional
dict differ in structure, e.g. `{"c_concat": None, ...}` in guess mode.
"""
from __future__ import annotations

from ldm.models.diffusion.ddim import DDIMSampler as _BatchedDDIMSampler


class DDIMSampler(_BatchedDDIMSampler):
    """`ldm.models.diffusion.ddim.DDIMSampler` with sequential classifier-free guidance."""

    def __init__(self, model, schedule: str = "linear", guidance: str = "sequential"):
        super().__init__(model, schedule=schedule, guidance=guidance)
