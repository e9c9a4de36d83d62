"""Before any work: the corpus cut into parts, and the index chosen and sized for it."""
