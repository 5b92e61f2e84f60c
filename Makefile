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

# The main job on the embedded default: a synthetic Fill50K (64 px), the tiny pretrained base shipped in
# models/demo_sd.safetensors (tool_pretrain_tiny_sd.py made it), tool_add_control.py, then tutorial_train.py on the
# CPU, evaluating control on 16 held-out items every 250 steps. Everything goes to $(DEMO_DIR)/ (recreated); the
# run's picture and its last evaluation grid are copied to docs/demo/ (the README shows them).
DEMO_DIR ?= demo_run
DEMO_STEPS ?= 3000
DEMO_LR ?= 3e-4
DEMO_CONFIG := models/cldm_demo.yaml
DEMO_BASE := models/demo_sd.safetensors

demo: setup
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	$(PY) tool_make_fill50k.py --out $(DEMO_DIR)/fill50k --count 5000 --size 64 --seed 1 --quiet
	$(PY) tool_add_control.py --config $(DEMO_CONFIG) $(DEMO_BASE) $(DEMO_DIR)/control_demo_ini.ckpt
	$(PY) tutorial_train.py --config $(DEMO_CONFIG) --resume_path $(DEMO_DIR)/control_demo_ini.ckpt \
		--data_root $(DEMO_DIR)/fill50k --accelerator cpu --max_steps $(DEMO_STEPS) --batch_size 8 \
		--learning_rate $(DEMO_LR) --logger_freq 500 --log_ddim_steps 20 --checkpoint_every_n_steps 1000 --seed 0 \
		--eval_every_n_steps 250 --val_items 16 --default_root_dir $(DEMO_DIR)
	mkdir -p docs/demo
	cp $(DEMO_DIR)/run.png docs/demo/run.png
	cp $$(ls $(DEMO_DIR)/image_log/val/step-*.png | tail -n 1) docs/demo/grid.png

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
