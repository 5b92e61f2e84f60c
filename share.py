"""What the original entry scripts get from `from share import *`; importing it runs nothing.

The original called `disable_verbosity()` (and `enable_sliced_attention()` when `config.save_memory`) at import;
scripts now call them explicitly.
"""
import config
from cldm.hack import disable_verbosity, enable_sliced_attention

__all__ = ["config", "disable_verbosity", "enable_sliced_attention"]
