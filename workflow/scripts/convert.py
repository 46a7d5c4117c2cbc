"""Snakemake job: convert and check every small checkpoint of one batch, in this one process."""
from ckpt_migrate.pipeline import OutputLayout, job_logging, run_batch

job_logging(snakemake.log[0])
run_batch(OutputLayout(snakemake.config["output_root"]), snakemake.wildcards.batch, dict(snakemake.params.check),
          dict(snakemake.params.overrides), snakemake.output.summary)
