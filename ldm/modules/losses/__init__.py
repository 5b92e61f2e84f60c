"""Training losses of the first stage (the VAE)."""
from ldm.modules.losses.reconstruction import ReconstructionKLLoss

__all__ = ["ReconstructionKLLoss"]
