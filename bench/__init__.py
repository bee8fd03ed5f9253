"""keyhive benchmarks: ``python -m bench [--quick] [--json out.json] [--only W1,W3]``."""
