"""Snakemake job: detect every new or changed checkpoint and list which get a conversion, in batches."""
import os

from ckpt_migrate.pipeline import OutputLayout, detect_and_plan, job_logging

job_logging(snakemake.log[0])
layout = OutputLayout(os.path.dirname(snakemake.output.plan))  # the plan lies at output_root's top
detect_and_plan(dict(snakemake.params.sources), dict(snakemake.params.relative), layout, snakemake.params.seconds,
                snakemake.params.memory_mb, dict(snakemake.params.overrides), snakemake.params.conversions_per_job,
                dict(snakemake.params.not_read), dict(snakemake.params.validation))
