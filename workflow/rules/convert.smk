# Conversion: one job per small-format checkpoint, on a GPU where the executor gives one.
# The check record is the rule's output; the converted .pt is published by the job only when
# the logit check passes, so a failed check is a finished job with a "failed" record (a
# failing member would fail its whole SLURM job group and remove the others' outputs).


rule convert:
    input:
        source=source_input,
        # Order only: the plan is rewritten whenever a new file lands, which must not redo this.
        plan=ancient(LAYOUT.plan),
    output:
        check=LAYOUT.check("{ckpt}"),
    params:
        source=source_path,
        manifest=lambda wildcards: LAYOUT.manifest(wildcards.ckpt),
        converted=converted_path,
        attempt=attempt_path,
        check=CHECK_SETTINGS,
        overrides=OVERRIDES,
        # rerun-triggers track params, not imported library code: a changed converter reruns.
        converter=CONVERTER_FINGERPRINT,
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=30,
    threads: 4
    conda:
        "../envs/ckpt_migrate.yaml"
    log:
        LAYOUT.log("convert", "{ckpt}"),
    benchmark:
        f"{OUT}/benchmarks/convert/{{ckpt}}.tsv"
    script:
        "../scripts/convert.py"
