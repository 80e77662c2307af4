# Shortcuts for the scripts the README documents.
.PHONY: serve test bench-merge
serve:
	bash scripts/serve.sh
test:
	bash scripts/test.sh
bench-merge:
	.venv/bin/python bench/merge_speed.py
