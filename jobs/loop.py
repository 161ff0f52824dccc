"""Ray job entrypoint: the online loop (sample the policy, label, train from it; repeated) over a run directory
that the pipeline has filled (``jobs/pipeline.py`` first, same config and ``root``).

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml --working-dir . -- \\
        python jobs/loop.py --config jobs/configs/demo_cpu.yaml root=/shared/runs train.loss=dpo [--rounds N] \\
            [key=value ...]

(The loop trains pairwise losses: the demo's config trains RRHF, hence ``train.loss=dpo``.)
"""

import sys

sys.path.pop(0)  # this folder: its stage-named scripts must not shadow installed modules (e.g. ``evaluate``)

from raydora.cli import main

if __name__ == "__main__":
    sys.exit(main(["loop", *sys.argv[1:]]))
