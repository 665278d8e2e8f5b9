"""`ray job submit` entrypoints: one module per stage and one for the whole pipeline.

Each is ``python -m jobs.<stage> CONFIG [key=value ...] [flags]``, the same arguments as the
``raydistill <stage>`` command; run from the job's working directory, so the cluster needs
raydistill's dependencies (the image) but not raydistill itself.
"""
