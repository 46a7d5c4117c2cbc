# Detection: one local job per checkpoint (no torch), then one aggregate checkpoint rule that
# decides which files get a conversion. A checkpoint per file would re-evaluate the DAG after
# every detection job; one aggregate checkpoint re-evaluates it once.


localrules:
    detect,
    plan,


rule detect:
    input:
        source=detect_input,
    output:
        manifest=f"{OUT}/manifests/{{ckpt}}.yaml",
    params:
        source=source_path,
        relative=lambda wildcards: RELATIVE_PATHS[wildcards.ckpt],
        detector=DETECTOR_FINGERPRINT,
        seconds=config["inspect_seconds"],
        memory_mb=config["inspect_memory_mb"],
        overrides=OVERRIDES,
    conda:
        "../envs/ckpt_migrate.yaml"
    log:
        f"{OUT}/logs/detect/{{ckpt}}.log",
    benchmark:
        f"{OUT}/benchmarks/detect/{{ckpt}}.tsv"
    script:
        "../scripts/detect.py"


checkpoint plan:
    input:
        manifests=[manifest_path(c) for c in CHECKPOINTS],
    output:
        plan=f"{OUT}/plan.tsv",
    params:
        checkpoints=CHECKPOINTS,
    conda:
        "../envs/ckpt_migrate.yaml"
    log:
        f"{OUT}/logs/plan.log",
    benchmark:
        f"{OUT}/benchmarks/plan.tsv"
    script:
        "../scripts/plan.py"
