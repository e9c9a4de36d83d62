"""Runs inside bench/.venv-autofaiss (autofaiss pins numpy<2): autofaiss build_index on a directory
of .npy files, timed; prints the timing and autofaiss's own index infos as JSON.

    bench/.venv-autofaiss/bin/python bench/build/autofaiss_build.py NPY_DIR OUT.index BUDGET METRIC CORES
"""
import json
import sys
import time


def main() -> None:
    npy, out, budget, metric, cores = sys.argv[1:6]
    t0 = time.time()
    from autofaiss import build_index

    t1 = time.time()
    _, infos = build_index(embeddings=npy, index_path=out, index_infos_path=out + ".json",
                           max_index_memory_usage=budget, current_memory_available="16G",
                           metric_type=metric, nb_cores=int(cores), verbose=30)
    t2 = time.time()
    print(json.dumps({"import": round(t1 - t0, 2), "build_index": round(t2 - t1, 2), "infos": infos}, default=str))


if __name__ == "__main__":
    main()
