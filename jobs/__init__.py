"""Ray job entrypoints: `python -m jobs.<name> --config X.yaml`, thin wrappers over the packages."""
