"""After the quantizer is trained: add the parts' vectors, merge them into shards, tune nprobe, publish."""
