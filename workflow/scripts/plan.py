"""Snakemake job: detect every new or changed checkpoint and list which get a conversion, in batches."""
from ckpt_migrate.pipeline import OutputLayout, detect_and_plan, job_logging

job_logging(snakemake.log[0])
detect_and_plan(dict(snakemake.params.sources), dict(snakemake.params.relative), OutputLayout(snakemake.config["output_root"]),
                snakemake.params.seconds, snakemake.params.memory_mb, dict(snakemake.params.overrides),
                snakemake.params.conversions_per_job, dict(snakemake.params.outside))
