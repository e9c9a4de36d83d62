"""shardex's batch pipeline: plan, encode, train, add, merge, publish."""
