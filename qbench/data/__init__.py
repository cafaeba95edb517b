"""Dataset loaders: the TSV image-caption format, builtin generated sets, text corpora."""
