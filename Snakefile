# ckpt-migrate: detect every checkpoint under input_root, convert the small-format ones to
# GPTBatched (on a GPU through SLURM with profiles/slurm), and report to CSV.
#   snakemake --profile profiles/slurm                  # on the cluster
#   snakemake --cores 2 --configfile config/demo.yaml   # locally, on the demo tree
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


wildcard_constraints:
    batch=r"b[0-9a-f]{12}",


include: "workflow/rules/common.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        LAYOUT.report_ok,
        LAYOUT.figures.values(),


onstart:
    start_run()


onsuccess:
    finish_run()


onerror:
    report_after_error()
