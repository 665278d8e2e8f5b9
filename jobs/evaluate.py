"""Held-out queries as traffic to the Serve app -> <run_dir>/eval (report, plots).

CPU cluster (e.g. the local one started by `ray start --head`):

    ray job submit --working-dir . --runtime-env jobs/runtime_env_cpu.yaml -- python -m jobs.evaluate jobs/configs/demo_cpu.yaml

GPU cluster:

    ray job submit --working-dir . --runtime-env jobs/runtime_env_gpu.yaml -- python -m jobs.evaluate jobs/configs/gpu_qwen3_moe.yaml
"""

import sys

from raydistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
