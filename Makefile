# Two entry points for a fresh clone (see README):
#   make search   set up .venv, then run a real search on DeiT-Tiny (../shared images, CPU)
#   make test     set up .venv, then run the test suite
# Everything is installed from this project's own pyproject.toml into .venv, at the exact versions
# recorded in constraints.txt (the lock: what the suite and the README's figures were produced with).
#   make lock     re-resolve every dependency to the newest this machine's index offers and
#                 rewrite constraints.txt (then run `make test` and commit both)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SHARED ?= ../shared

# Pretrained weights come from the standard Hugging Face cache; point it at ../shared when present.
ifneq ($(wildcard $(SHARED)/hf-cache/hub),)
export HF_HUB_CACHE ?= $(abspath $(SHARED)/hf-cache/hub)
export HF_HUB_OFFLINE ?= 1
endif
export RAPID_SHARED ?= $(abspath $(SHARED))

BUDGET  ?= 50%GFLOPs
TRIALS  ?= 40
DEVICE  ?= cpu
MODEL   ?= deit_tiny_patch16_224

.PHONY: setup search test studies front-studies clean lock wheel-check

LOCK   := constraints.txt

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) pip
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[test]'
	touch $@

# A throwaway venv resolves '.[test]' afresh; its exact versions (pip and setuptools too) become the lock.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q '.[test]'
	{ echo "# The lock: exact versions of every dependency of rapid-search[test] (runtime, search, postgres, test)."; \
	  echo "# Written by 'make lock' on $$(date -u +%Y-%m-%d) with $$(.lock-venv/bin/python -V); used by 'make setup' (pip -c)."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable | grep -iv '^rapid[-_]search' | LC_ALL=C sort -f; } > $(LOCK)
	rm -rf .lock-venv

setup: $(BIN)/.installed

search: setup
	$(BIN)/rapid-search search --model $(MODEL) --data $(SHARED)/data/imagenet-calib \
	    --budget $(BUDGET) --device $(DEVICE) --trials $(TRIALS) --out studies/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The tuned schedules shipped in studies/ (README "Shipped schedules"): calibrated on the whole
# imagenet-calib pool, then evaluated on imagenet-eval (never calibrated on) into *.eval.json.
STUDY_MODELS ?= deit_tiny_patch16_224 vit_tiny_patch16_224
STUDY_RATIOS ?= 70 50 35
STUDY_TRIALS ?= 40
STUDY_CALIB ?= 750
STUDY_THREADS ?= 1
studies: setup
	for m in $(STUDY_MODELS); do for r in $(STUDY_RATIOS); do \
	  $(BIN)/rapid-search search --model $$m --data $(SHARED)/data/imagenet-calib --budget $${r}%GFLOPs \
	    --trials $(STUDY_TRIALS) --calib-images $(STUDY_CALIB) --seed 0 --metric kl --progress plain \
	    --threads $(STUDY_THREADS) --study-name $$m-$${r}pct --out studies/$$m-$${r}pct.yaml || exit 1; \
	  $(BIN)/rapid-search evaluate --schedule studies/$$m-$${r}pct.yaml --data $(SHARED)/data/imagenet-eval \
	    --threads $(STUDY_THREADS) --batch-size 32 --json studies/$$m-$${r}pct.eval.json || exit 1; \
	done; done

# The front studies shipped in studies/: one 35%..70%GFLOPs study per model (90 trials), exported at 70/50/35%.
front-studies: setup
	for m in $(STUDY_MODELS); do \
	  $(BIN)/rapid-search search --model $$m --data $(SHARED)/data/imagenet-calib --budget 35%..70%GFLOPs \
	    --trials 90 --calib-images $(STUDY_CALIB) --seed 0 --metric kl --progress plain \
	    --threads $(STUDY_THREADS) --study-name $$m-front --out studies/$$m-front.yaml || exit 1; \
	  for r in $(STUDY_RATIOS); do $(BIN)/rapid-search export --study-name $$m-front --budget $${r}%GFLOPs \
	    --out studies/$$m-front-$${r}pct.yaml || exit 1; done; \
	  $(BIN)/rapid-search front --study-name $$m-front --out benchmarks/front/$$m.png > benchmarks/front/$$m.txt || exit 1; \
	done

# The wheel is the product: build it, install it alone into a fresh venv (runtime only, then with
# the search extras), and run the README's Python API example and main command from outside the tree.
wheel-check:
	bash scripts/wheel_check.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .lock-venv
