"""Teacher sampling: queries -> vLLM (ray.data.llm) -> <run_dir>/samples.

CPU cluster (e.g. the local one started by `ray start --head`):

    ray job submit --working-dir . --runtime-env jobs/runtime_env_cpu.yaml -- python -m jobs.generate jobs/configs/demo_cpu.yaml --resume

GPU cluster:

    ray job submit --working-dir . --runtime-env jobs/runtime_env_gpu.yaml -- python -m jobs.generate jobs/configs/gpu_qwen3_moe.yaml --resume
"""

import sys

from raydistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
