"""The whole pipeline: generate -> train -> serve -> evaluate.

CPU cluster (e.g. the local one started by `ray start --head`):

    ray job submit --working-dir . --runtime-env jobs/runtime_env_cpu.yaml -- python -m jobs.run jobs/configs/demo_cpu.yaml --resume

GPU cluster:

    ray job submit --working-dir . --runtime-env jobs/runtime_env_gpu.yaml -- python -m jobs.run jobs/configs/gpu_qwen3_moe.yaml --resume
"""

import sys

from raydistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
