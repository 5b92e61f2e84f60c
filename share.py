"""Compatibility module for the original scripts' `from share import *`: it gives them `config`,
`disable_verbosity` and `enable_sliced_attention`, and importing it runs nothing.

No script of this project imports it: each calls what it needs itself (`cldm.cli.run` sets up logging;
`cldm.hack.enable_sliced_attention(model)` slices attention for low-VRAM sampling).
"""
import config
from cldm.hack import disable_verbosity, enable_sliced_attention

__all__ = ["config", "disable_verbosity", "enable_sliced_attention"]
