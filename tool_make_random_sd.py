"""Write a randomly initialised "Stable Diffusion" checkpoint of a config, for demos, tests and benchmarks.

The file has the layout of a real SD checkpoint of that architecture (every key of the config's
ControlLDM except `control_model.*`), so `tool_add_control.py` treats it like v1-5-pruned.ckpt.
It is not a usable image model: real images need the real SD1.5 / SD2.1 weights.

    python tool_make_random_sd.py --config models/cldm_tiny.yaml ./models/tiny_sd.ckpt
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

import torch

from cldm.checkpoint_io import check_output_path, save_state_dict
from cldm.cli import add_debug_argument, run
from cldm.model import check_config_path, create_model

logger = logging.getLogger(__name__)


@torch.no_grad()
def randomize_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter random, non-zero values of a sensible scale.

    A freshly built model is degenerate as a "pretrained" one: the zero-initialised output layers
    (UNet `out`, ResBlock `out_layers`, transformer `proj_out`) make the UNet ignore its input.
    Weights get N(0, 1/fan_in), normalisation scales 1 + N(0, 0.02^2), biases N(0, 0.02^2).
    """
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.ndim >= 2:
            param.copy_(noise / param[0].numel() ** 0.5)
        elif name.endswith("weight"):
            param.copy_(1.0 + 0.02 * noise)
        else:
            param.copy_(0.02 * noise)


def random_base_state_dict(config_path: str, seed: int) -> dict[str, torch.Tensor]:
    """A random-weight state dict of `config_path`'s model, without the ControlNet."""
    model = create_model(config_path)
    randomize_(model, torch.Generator().manual_seed(seed))
    return {key: value for key, value in model.state_dict().items() if not key.startswith("control_model.")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="checkpoint to write (.ckpt, .pth or .safetensors)")
    parser.add_argument("--config", default="./models/cldm_tiny.yaml", help="model config (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    check_config_path(args.config)
    check_output_path(args.output)
    start = time.perf_counter()
    state_dict = random_base_state_dict(args.config, args.seed)
    save_state_dict(state_dict, args.output)
    logger.info("Wrote %d random tensors (%s layout) to %s in %.1f s.", len(state_dict), args.config, args.output,
                time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
