"""Stage 1: teacher sampling (ray.data.llm + vLLM) into validated Parquet."""
