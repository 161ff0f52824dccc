"""Ray job entrypoint for one stage: reference log-probs on a Ray Data actor pool into reference/.

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml --working-dir . -- \\
        python jobs/reference.py --config jobs/configs/demo_cpu.yaml root=/shared/runs [key=value ...]

The same as ``raydora reference``; jobs/pipeline.py runs every stage.
"""

import sys

sys.path.pop(0)  # this folder: its stage-named scripts must not shadow installed modules (e.g. ``evaluate``)

from raydora.cli import main

if __name__ == "__main__":
    sys.exit(main(["reference", *sys.argv[1:]]))
