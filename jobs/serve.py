"""The OpenAI-compatible Ray Serve app (student, teacher, base) until the job is stopped.

CPU cluster (e.g. the local one started by `ray start --head`):

    ray job submit --working-dir . --runtime-env jobs/runtime_env_cpu.yaml -- python -m jobs.serve jobs/configs/demo_cpu.yaml

GPU cluster:

    ray job submit --working-dir . --runtime-env jobs/runtime_env_gpu.yaml -- python -m jobs.serve jobs/configs/gpu_qwen3_moe.yaml
"""

import sys

from raydistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
