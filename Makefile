# ImageFinder. `make demo` to try it offline, `make run` to serve the real catalogue (needs
# network), `make test` to run the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: venv run demo test lint format bench bench-stores bench-quality loadtest hostile clean

$(BIN)/imagefinder: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/imagefinder

## Download the 295-row catalogue, index it with resnet50, serve on :8000.
run: venv
	$(BIN)/python download_images.py --csv_file data/images.csv
	$(BIN)/python extract_image_features.py --folder data/images
	$(BIN)/python -m imagefinder serve --host 127.0.0.1 --port $(PORT)

## Offline demo: the sample photos in assets/demo with efficientnet-lite2.
demo: venv
	$(BIN)/python extract_image_features.py --folder assets/demo --db data/demo-lite2.db --model efficientnet-lite2
	IMAGEFINDER_DB=data/demo-lite2.db IMAGEFINDER_IMAGES_DIR=assets/demo $(BIN)/python -m imagefinder serve --host 127.0.0.1 --port $(PORT)

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Speed and quality, side by side (about 15-25 min); bench/results/<time>.{json,md}.
## faiss (a reference in the KNN section) comes with the dev extra, or pip install -e '.[bench]'.
bench: venv
	$(BIN)/python bench/bench.py --sweep

## pgvector HNSW vs the SQLite path over 100k synthetic vectors; bench/results/stores-<time>.json
## (--commit refreshes the tracked stores.{json,md}).
bench-stores: venv
	$(BIN)/python bench/bench_stores.py

## Every model x αQE x DBA on the dev split, and their search latency; bench/results/quality.*.
bench-quality: venv
	$(BIN)/python bench/quality.py --commit

## 60 s, 8 clients against a live server; bench/results/loadtest-<time>.{json,md}
## (--commit refreshes the tracked loadtest.{json,md}).
loadtest: venv
	$(BIN)/python bench/loadtest.py

## Hostile uploads, idle sockets, 100k failing rows against a live server (~5 min);
## python bench/hostile.py --commit writes bench/results/hostile.{json,md}.
hostile: venv
	$(BIN)/python bench/hostile.py

clean:
	rm -rf $(VENV) .pytest_cache
