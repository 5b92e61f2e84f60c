"""Small state dicts for the checkpoint tests."""
from __future__ import annotations

import torch


def sample_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3, generator=generator),
        "first_stage_model.quant_conv.bias": torch.randn(8, generator=generator).half(),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)  # safetensors files store keys sorted
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key
