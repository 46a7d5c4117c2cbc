"""Snakemake job: one report row per checkpoint, from the manifests and check records."""
from ckpt_migrate.pipeline import job_logging, write_report

job_logging(snakemake.log[0])
write_report(list(snakemake.input.manifests), list(snakemake.input.checks), snakemake.output.csv)
