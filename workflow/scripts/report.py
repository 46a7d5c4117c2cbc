"""Snakemake job: one report row per checkpoint, from the plan, the manifests and the check records."""
import os

from ckpt_migrate.pipeline import OutputLayout, job_logging, write_report

job_logging(snakemake.log[0])
write_report(OutputLayout(os.path.dirname(snakemake.output.csv)))
