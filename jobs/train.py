"""Student fine-tuning: Ray Train + DeepSpeed ZeRO + PEFT -> <run_dir>/student.

CPU cluster (e.g. the local one started by `ray start --head`):

    ray job submit --working-dir . --runtime-env jobs/runtime_env_cpu.yaml -- python -m jobs.train jobs/configs/demo_cpu.yaml

GPU cluster:

    ray job submit --working-dir . --runtime-env jobs/runtime_env_gpu.yaml -- python -m jobs.train jobs/configs/gpu_qwen3_moe.yaml
"""

import sys

from raydistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
