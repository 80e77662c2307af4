# Shortcuts for the scripts the README documents.
.PHONY: serve test test-fast bench-merge
PYTHON ?= .venv/bin/python
# The fast lane: merging invariants and peft parity, adapter I/O, the merge CLI, the kernels'
# torch reference, composition parsing, settings, sampling, error envelopes. No server
# subprocess, no vLLM, no Triton interpreter; under a minute on 2 cores.
FAST_TESTS = tests/test_merging_invariants.py tests/test_adapter_io.py tests/test_merge_cli.py \
	tests/test_kernels_reference.py tests/test_composition.py tests/test_server_settings.py \
	tests/test_local_engine_sampling.py
serve:
	bash scripts/serve.sh
test:
	bash scripts/test.sh
test-fast:
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
	  $(PYTHON) -m pytest -q -p no:cacheprovider $(FAST_TESTS)
bench-merge:
	$(PYTHON) -m bench.merge_speed
