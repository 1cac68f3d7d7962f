"""The benchmarks: `python -m bench COMMAND` (bench/cli.py lists them; `make bench`,
`make bench-adapters` and `make bench-mfu` run the three that write docs/benchmarks.md)."""
