"""Measuring a version: recall against exact search, QPS and latency per nprobe."""
