"""Compatibility name for the original scripts' `save_memory` switch: nothing in this project reads it.

For low-VRAM sampling call `cldm.hack.enable_sliced_attention(model)` on the built model.
"""
save_memory = False
