"""Snakemake job: fail the run (after the report exists) if a conversion failed its check."""
from ckpt_migrate.pipeline import check_gate, job_logging

job_logging(snakemake.log[0])
check_gate(snakemake.input.csv, snakemake.output.flag, snakemake.params.allow_check_failures)
