"""Ray job entrypoint: every raydora stage in order over one run directory; finished stages skip themselves.

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml --working-dir . -- \\
        python jobs/pipeline.py --config jobs/configs/demo_cpu.yaml root=/shared/runs [--stages a,b] [key=value ...]

Inside a Ray job, raydora joins the job's cluster (``RAY_ADDRESS``). Give ``root`` as an absolute path on a
filesystem every node shares: the job runs in a copy of the working directory that is deleted afterwards.
"""

import sys

sys.path.pop(0)  # this folder: its stage-named scripts must not shadow installed modules (e.g. ``evaluate``)

from raydora.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
