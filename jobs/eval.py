"""Ray job: evaluate an index (recall@k against exact search, QPS, latency per nprobe).

    ray job submit --working-dir . -- python -m jobs.eval --config eval.yaml

The YAML keys are `shardex eval`'s argument and option names with underscores
(index_root, queries, k, nprobe, num_queries, out, target_recall, ...); flags after
--config override them. It runs in the job's driver: the shards are searched in process.
"""
import sys

from index_builder.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
