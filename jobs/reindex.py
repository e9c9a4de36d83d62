"""Ray job: incremental reindex of a changed corpus into a new version (the nightly job).

    ray job submit --working-dir . -- python -m jobs.reindex --config reindex.yaml

The YAML keys are `shardex reindex`'s argument and option names with underscores: source,
index_root, and optionally retrain, keep, grace, drift_error, drift_imbalance and any build
option (left out, a build option keeps the live version's value). Flags after --config
override the file. Inside a job, RAY_ADDRESS is set, so the reindex joins the cluster.
"""
import sys

from index_builder.cli import main

if __name__ == "__main__":
    sys.exit(main(["reindex", *sys.argv[1:]]))
