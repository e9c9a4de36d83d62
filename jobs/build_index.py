"""Ray job: build and publish an index.

    ray job submit --working-dir . -- python -m jobs.build_index --config build.yaml

The YAML keys are `shardex build`'s argument and option names with underscores
(source, index_root, text_column, factory, shards, ...); flags after --config
override them. Inside a job, RAY_ADDRESS is set, so the build joins the cluster.
"""
import sys

from index_builder.cli import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
