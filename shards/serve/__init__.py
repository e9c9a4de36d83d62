"""The Ray Serve app: shard and router deployments, the HTTP API, live version swaps."""
