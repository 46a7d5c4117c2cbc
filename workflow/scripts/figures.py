"""Snakemake job: the report's figures and the table of files that need a person."""
from ckpt_migrate.pipeline import job_logging
from ckpt_migrate.plots import write_report_figures

job_logging(snakemake.log[0])
write_report_figures(snakemake.input.csv, **dict(snakemake.output.items()))
