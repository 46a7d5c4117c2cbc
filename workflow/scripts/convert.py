"""Snakemake job: convert one small checkpoint, check its logits, write the check record."""
from ckpt_migrate.pipeline import job_logging, run_conversion

job_logging(snakemake.log[0])
run_conversion(snakemake.params.source, snakemake.params.manifest, snakemake.params.converted,
               snakemake.output.check, dict(snakemake.params.check), snakemake.params.attempt,
               dict(snakemake.params.overrides))
