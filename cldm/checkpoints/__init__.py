"""Checkpoints and weights: atomic writing (`atomic`), output-path checks (`paths`), saving (`saving`), which model
a state dict holds (`kinds`), Lightning's checkpoint plugin (`lightning_io`), surgery (`surgery`) and the file-level
tools built on them (`initial_weights`, `transfer`, `extraction`, `diffusers_export`, `random_weights`).

Reading checkpoints safely is `ldm.checkpoint`, which the ldm core needs too.
"""
