"""Incremental reindex: what changed since the live version, and whether its quantizer still fits."""
