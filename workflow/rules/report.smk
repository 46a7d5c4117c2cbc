# Report: one row per checkpoint the glob found, then a gate that fails the run (after the
# report is written) when a conversion failed its check and allow_check_failures is false.


localrules:
    report,
    gate,


rule report:
    input:
        unpack(report_inputs),
    output:
        csv=f"{OUT}/report.csv",
    params:
        checkpoints=CHECKPOINTS,
    conda:
        "../envs/ckpt_migrate.yaml"
    log:
        f"{OUT}/logs/report.log",
    benchmark:
        f"{OUT}/benchmarks/report.tsv"
    script:
        "../scripts/report.py"


rule gate:
    input:
        csv=f"{OUT}/report.csv",
    output:
        flag=report_gate_flag(),
    params:
        allow_check_failures=config["allow_check_failures"],
    conda:
        "../envs/ckpt_migrate.yaml"
    log:
        f"{OUT}/logs/gate.log",
    benchmark:
        f"{OUT}/benchmarks/gate.tsv"
    script:
        "../scripts/gate.py"
