"""Snakemake job: detect one checkpoint's format and write its manifest (no torch)."""
from ckpt_migrate.pipeline import job_logging, write_manifest

job_logging(snakemake.log[0])
write_manifest(snakemake.params.source, snakemake.params.relative, snakemake.output.manifest,
               snakemake.params.seconds, snakemake.params.memory_mb, dict(snakemake.params.overrides))
