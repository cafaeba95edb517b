"""The parent process: run a suite (api.run_suite), plan, preflight, resume; executors/ run the cells, one process each."""
