"""The training job (`cldm.training.job`), its command line (`arguments`), callbacks, optimizers, and speed and
memory options. `from cldm import training; training.main(argv, training.SINGLE_DEVICE_DEFAULTS, ...)` runs it."""
from cldm.training.arguments import (
    DISTRIBUTED_DEFAULTS,
    SD21_DEFAULTS,
    SINGLE_DEVICE_DEFAULTS,
    build_parser,
    check_args,
)
from cldm.training.job import (
    apply_host_memory_option,
    build_callbacks,
    build_dataloader,
    build_dataset,
    build_model,
    build_trainer,
    check_dataset,
    main,
)

__all__ = [
    "DISTRIBUTED_DEFAULTS", "SD21_DEFAULTS", "SINGLE_DEVICE_DEFAULTS", "apply_host_memory_option", "build_callbacks",
    "build_dataloader", "build_dataset", "build_model", "build_parser", "build_trainer", "check_args", "check_dataset", "main",
]
