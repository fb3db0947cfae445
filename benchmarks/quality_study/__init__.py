"""The quality study's modules (``benchmarks/quality.py`` is its command line), in the order they build on each
other: plan (budgets, students, rows, configs) → steps (resumable steps) → runner (training, geometry, evaluation
of one step) and assets (what units share, built once) → report (statistics and report.md)."""
