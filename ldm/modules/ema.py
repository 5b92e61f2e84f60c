"""Exponential moving average of a model's trainable parameters, kept as buffers so it is saved with the model."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class LitEma(nn.Module):
    """EMA shadow of every trainable parameter of `model`, stored as a buffer named after it with the dots removed.

    Args:
        model: the module whose trainable parameters are tracked.
        decay: the largest decay used; early updates use (1 + n) / (10 + n) when that is smaller.
        use_num_upates: count updates and warm the decay up as above (the original's spelling of the name).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"LitEma decay must be between 0 and 1, got {decay}")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        # -1 marks "no update counting": the decay stays constant.
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            shadow_name = name.replace(".", "")
            if shadow_name in self.m_name2s_name.values():
                raise ValueError(f"LitEma cannot track '{name}': its buffer name '{shadow_name}' is already taken")
            self.m_name2s_name[name] = shadow_name
            self.register_buffer(shadow_name, param.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    def reset_num_updates(self) -> None:
        """Restart the decay warm-up from zero updates."""
        del self.num_updates
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int))

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        # 1. the decay of this step, warmed up while few updates have been made
        decay = self.decay
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        one_minus_decay = 1.0 - decay
        # 2. move every shadow towards its parameter: shadow <- shadow - (1 - d) * (shadow - param)
        shadows = dict(self.named_buffers())
        for name, param in self._tracked_parameters(model):
            shadow = shadows[self.m_name2s_name[name]]
            shadow.sub_(one_minus_decay * (shadow - param.to(shadow.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the trainable parameters of `model` with their EMA values."""
        shadows = dict(self.named_buffers())
        for name, param in self._tracked_parameters(model):
            param.copy_(shadows[self.m_name2s_name[name]])

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep copies of `parameters` so `restore` can put them back after evaluating with EMA weights."""
        self.collected_params = [param.detach().clone() for param in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Copy the values saved by `store` back into `parameters` (same order)."""
        for saved, param in zip(self.collected_params, parameters):
            param.copy_(saved)

    def _tracked_parameters(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
        """The trainable parameters of `model`, checked against the ones tracked at construction."""
        for name, param in model.named_parameters():
            if param.requires_grad != (name in self.m_name2s_name):
                raise ValueError(
                    f"LitEma tracks the parameters that were trainable when it was built; '{name}' has changed "
                    f"(requires_grad={param.requires_grad}): build a new LitEma for this model"
                )
            if param.requires_grad:
                yield name, param
