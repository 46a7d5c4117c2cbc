"""Snakemake job: list every checkpoint's detection status; the small ones get conversions."""
from ckpt_migrate.pipeline import job_logging, write_plan

job_logging(snakemake.log[0])
write_plan(dict(zip(snakemake.params.checkpoints, snakemake.input.manifests)), snakemake.output.plan)
