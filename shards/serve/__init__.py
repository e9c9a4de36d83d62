"""The Ray Serve app: the version deployments, the router's HTTP API, its batching, live version swaps, start/stop."""
