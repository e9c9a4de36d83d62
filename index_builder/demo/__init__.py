"""Demo data, apart from the pipeline: the standard library's docstrings and man pages as a corpus."""
