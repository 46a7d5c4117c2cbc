# Detection and plan: one local job that detects every new or changed checkpoint (each in a
# budgeted child process, no torch) and lists which need a conversion. It is a checkpoint, so
# the conversions are known only once it has run; a rerun reuses every manifest whose file,
# detector and overrides are unchanged, so it detects only what is new.


localrules:
    plan,


checkpoint plan:
    input:
        sources=detect_inputs(),
    output:
        plan=LAYOUT.plan,
    log:
        LAYOUT.plan_log,
    benchmark:
        LAYOUT.benchmark("plan")
    conda:
        "../envs/ckpt_migrate.yaml"
    params:
        sources=SOURCES,
        identities=source_identities(SOURCES),
        relative=RELATIVE_PATHS,
        not_read=NOT_READ,
        validation=config["validation"],
        validation_shards=VALIDATION_SHARDS,
        seconds=config["inspect_seconds"],
        memory_mb=config["inspect_memory_mb"],
        overrides=OVERRIDES,
        conversions_per_job=config["conversions_per_job"],
        detector=DETECTOR_FINGERPRINT,
    script:
        "../scripts/plan.py"
