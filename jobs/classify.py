"""Ray job entrypoint for one stage: train and calibrate the golden-vs-source classifiers, then score the data
into scored/.

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml --working-dir . -- \\
        python jobs/classify.py --config jobs/configs/demo_cpu.yaml root=/shared/runs [key=value ...]

The same as ``raydora classify``; jobs/pipeline.py runs every stage.
"""

import sys

sys.path.pop(0)  # this folder: its stage-named scripts must not shadow installed modules (e.g. ``evaluate``)

from raydora.cli import main

if __name__ == "__main__":
    sys.exit(main(["classify", *sys.argv[1:]]))
