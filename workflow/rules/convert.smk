# Conversion, in batches: the plan puts the small-format files that are new or changed into
# batches of up to conversions_per_job, and one convert_batch job (one SLURM job, on a GPU where
# the executor gives one) converts a whole batch in one process, so Python, torch and CUDA start
# once per batch, not once per file. It writes each file's record and log the moment that file
# is done (staged/), and a failed check is a record, not a failed job. The per-file convert
# job publishes that record as the file's output: reruns, -n and the report stay per file.


rule convert_batch:
    input:
        # Order only: the plan is rewritten whenever a new file lands, which must not redo this.
        plan=ancient(LAYOUT.plan),
    output:
        summary=LAYOUT.batch("{batch}"),
    log:
        LAYOUT.batch_log("{batch}"),
    benchmark:
        LAYOUT.benchmark("convert_batch/{batch}")
    conda:
        "../envs/ckpt_migrate.yaml"
    threads: CONVERT_JOB_RESOURCES["cpus_per_task"]
    resources:
        gpu=CONVERT_JOB_RESOURCES["gpu"],
        mem_mb=CONVERT_JOB_RESOURCES["mem_mb"],
        cpus_per_task=CONVERT_JOB_RESOURCES["cpus_per_task"],
        # The profile's runtime for convert_batch, if set, wins over this (Snakemake's precedence).
        runtime=batch_runtime,
    params:
        check=CHECK_SETTINGS,
        overrides=OVERRIDES,
        # rerun-triggers track params, not imported library code: a changed converter reruns.
        converter=CONVERTER_FINGERPRINT,
    script:
        "../scripts/convert.py"


localrules:
    convert,


rule convert:
    input:
        batch=batch_summary,
    output:
        check=LAYOUT.check("{ckpt}"),
    log:
        LAYOUT.log("convert", "{ckpt}"),
    benchmark:
        LAYOUT.benchmark("convert/{ckpt}")
    conda:
        "../envs/ckpt_migrate.yaml"
    params:
        staged=lambda wildcards: LAYOUT.staged(wildcards.ckpt),
        staged_log=lambda wildcards: LAYOUT.staged_log(wildcards.ckpt),
        converter=CONVERTER_FINGERPRINT,
    shell:
        # Only the files the batch job wrote: never a link's target, never a FIFO, copied out.
        "for f in {params.staged_log:q} {params.staged:q}; do"
        ' if [ ! -f "$f" ] || [ -L "$f" ] || [ "$(stat -c %h "$f")" != 1 ]; then'
        ' echo "$f is not a file the conversion job wrote (a link, FIFO or folder): remove it and rerun" >&2;'
        " exit 1; fi; done;"
        " cp --remove-destination {params.staged_log:q} {log:q} && cp --remove-destination {params.staged:q} {output.check:q}"
