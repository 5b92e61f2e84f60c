"""Global switch of the original scripts: set `save_memory = True` for low-VRAM mode (sliced attention)."""
save_memory = False
