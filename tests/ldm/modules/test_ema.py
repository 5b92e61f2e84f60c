"""LitEma: buffer layout, the warmed-up decay formula, copy_to and store/restore."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.modules.ema import LitEma


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    return model


def _nudge(model: nn.Module, step: int) -> None:
    """Move every trainable parameter somewhere new."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(step)))


def test_buffers_mirror_trainable_parameters() -> None:
    ema = LitEma(_model())
    state = ema.state_dict()
    assert list(state) == ["decay", "num_updates", "0weight", "0bias", "2weight"]
    assert state["decay"].dtype == torch.float32 and torch.equal(state["decay"], torch.tensor(0.9999))
    assert state["num_updates"].dtype == torch.int32 and state["num_updates"].shape == ()
    assert state["num_updates"].item() == 0
    torch.testing.assert_close(state["0weight"], _model()[0].weight.detach())
    assert ema.m_name2s_name == {"0.weight": "0weight", "0.bias": "0bias", "2.weight": "2weight"}


def test_update_uses_warmed_up_decay() -> None:
    model, decay = _model(), 0.3
    ema = LitEma(model, decay=decay)
    expected = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    for n in range(1, 5):
        _nudge(model, n)
        ema(model)
        # d = min(decay, (1 + n) / (10 + n)): 2/11, 3/12 then 0.3 from the third update on
        d = min(decay, (1 + n) / (10 + n))
        for name, param in model.named_parameters():
            if param.requires_grad:
                expected[name] -= (1 - d) * (expected[name] - param.detach())
        assert ema.num_updates.item() == n
        for name, value in expected.items():
            torch.testing.assert_close(getattr(ema, name.replace(".", "")), value)
    torch.testing.assert_close(ema.get_buffer("2weight"), expected["2.weight"])


def test_constant_decay_without_update_counting() -> None:
    model = _model()
    ema = LitEma(model, decay=0.9, use_num_upates=False)
    start = model[0].weight.detach().clone()
    _nudge(model, 1)
    ema(model)
    assert ema.num_updates.item() == -1
    torch.testing.assert_close(ema.get_buffer("0weight"), start - 0.1 * (start - model[0].weight.detach()))
    ema.reset_num_updates()
    assert ema.num_updates.item() == 0 and ema.num_updates.dtype == torch.int32


def test_copy_to_store_and_restore() -> None:
    model = _model()
    ema = LitEma(model)
    initial = [param.detach().clone() for param in model.parameters()]
    _nudge(model, 1)
    trained = [param.detach().clone() for param in model.parameters()]

    ema.store(model.parameters())
    ema.copy_to(model)  # the shadows still hold the initial values (decay warm-up is per update)
    for param, before, after in zip(model.parameters(), initial, trained):
        torch.testing.assert_close(param.detach(), before if param.requires_grad else after)
    ema.restore(model.parameters())
    for param, after in zip(model.parameters(), trained):
        torch.testing.assert_close(param.detach(), after)


def test_user_errors() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        LitEma(_model(), decay=1.5)
    model = _model()
    ema = LitEma(model)
    model[2].bias.requires_grad_(True)
    with pytest.raises(ValueError, match="2.bias"):
        ema(model)
