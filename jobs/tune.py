"""Ray job entrypoint: a Ray Tune search over ``tune.space`` whose trials are child runs of the run directory
(the upstream stages run first, once; rerun the same command to resume an interrupted search).

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml --working-dir . -- \\
        python jobs/tune.py --config jobs/configs/demo_cpu.yaml root=/shared/runs \\
        'tune.space.train.lam=loguniform(0.01, 10)' tune.num_samples=16 [key=value ...]
"""

import sys

sys.path.pop(0)  # this folder: its stage-named scripts must not shadow installed modules (e.g. ``evaluate``)

from raydora.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
