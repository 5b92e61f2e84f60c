"""ControlNet on the ldm core: the model (`cldm`, `ddim_hacked`, `hack`, `logger`, `model`, `sampling`), the
training job (`training`), checkpoints and weights (`checkpoints`), data (`data`), and the scripts' error
handling (`cli`)."""
