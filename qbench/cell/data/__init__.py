"""Data loaders (child process, and the parent's preflight): the TSV format, generated image sets, text corpora.
The builtin sets are named in qbench.contract.tasks.BUILTIN_DATASETS."""
