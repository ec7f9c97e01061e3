# Quick start: `make quickstart` (set-up + train + evaluate + overlay pictures), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
QUICKSTART_CFG := configs/quickstart/mask_rcnn_R18_FPN_synthetic.yaml
QUICKSTART_OUT := output/quickstart

.PHONY: setup test quickstart

setup:
	VENV=$(VENV) tools/setup_env.sh

test: setup
	$(PY) -m pytest tests

quickstart: setup
	$(PY) projects/train_net.py --config-file $(QUICKSTART_CFG) OUTPUT_DIR $(QUICKSTART_OUT)
	$(PY) projects/demo.py --config-file $(QUICKSTART_CFG) --dataset synthetic_shapes_val \
		--max-images 12 --output $(QUICKSTART_OUT)/vis --opts MODEL.WEIGHTS $(QUICKSTART_OUT)/model_final.pth
