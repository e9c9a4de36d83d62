"""Ray job: serve an index root over HTTP (a Ray Serve app that follows CURRENT).

    ray job submit --working-dir . -- python -m jobs.serve --config serve.yaml

The YAML keys are `shardex serve`'s argument and option names with underscores
(index_root, host, port, replicas, token, require_all_shards, shard_timeout,
poll_seconds, ...); flags after --config override them. Inside a job, RAY_ADDRESS
is set, so the app is deployed on the job's cluster. The job runs until it is
stopped (`ray job stop`), which deletes the app; with `detach: true` it returns
once the app serves and leaves it running on the cluster.

`ray job stop` gives a job 3 s before it kills it: enough to delete the apps, not always to
shut Serve's proxy down after them. To have the job stop Serve as well, give it longer:
`--runtime-env-json '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "30"}}'`.
"""
import sys

from index_builder.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
