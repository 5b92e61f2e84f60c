# All set-up happens here: `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# The main job on the embedded default: synthetic Fill50K (64 px), a tiny random "Stable Diffusion",
# tool_add_control.py, then tutorial_train.py on the CPU, evaluating control on 16 held-out items every 100 steps:
# $(DEMO_DIR)/run.png shows the loss and val/control_f1 against the step. Everything goes to $(DEMO_DIR)/ (recreated).
DEMO_DIR ?= demo_run
TINY := models/cldm_tiny.yaml

demo: setup
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	$(PY) tool_make_fill50k.py --out $(DEMO_DIR)/fill50k --count 1000 --size 64 --quiet
	$(PY) tool_make_random_sd.py --config $(TINY) $(DEMO_DIR)/tiny_sd.ckpt
	$(PY) tool_add_control.py --config $(TINY) $(DEMO_DIR)/tiny_sd.ckpt $(DEMO_DIR)/control_tiny_ini.ckpt
	$(PY) tutorial_train.py --config $(TINY) --resume_path $(DEMO_DIR)/control_tiny_ini.ckpt \
		--data_root $(DEMO_DIR)/fill50k --accelerator cpu --max_steps 300 --learning_rate 1e-4 \
		--logger_freq 100 --log_ddim_steps 20 --checkpoint_every_n_steps 100 --seed 0 \
		--eval_every_n_steps 100 --val_items 16 --default_root_dir $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
