"""Snakemake job: convert and check every small checkpoint of one batch, in this one process."""
import os

from ckpt_migrate.pipeline import OutputLayout, job_logging, run_batch

job_logging(snakemake.log[0])
summary = snakemake.output.summary  # output_root/batches/<batch>.yaml
layout = OutputLayout(os.path.dirname(os.path.dirname(summary)))
run_batch(layout, snakemake.wildcards.batch, dict(snakemake.params.check), dict(snakemake.params.overrides), summary)
