# Report: one row per checkpoint the glob found, then a gate that fails the run (after the
# report is written) when a conversion failed its check and allow_check_failures is false.


localrules:
    report,
    figures,
    gate,


rule report:
    input:
        unpack(report_inputs),
    output:
        csv=LAYOUT.report,
    log:
        f"{OUT}/logs/report.log",
    benchmark:
        f"{OUT}/benchmarks/report.tsv"
    conda:
        "../envs/ckpt_migrate.yaml"
    params:
        checkpoints=CHECKPOINTS,
    script:
        "../scripts/report.py"


rule gate:
    input:
        csv=rules.report.output.csv,
    output:
        flag=report_gate_flag(),
    log:
        f"{OUT}/logs/gate.log",
    benchmark:
        f"{OUT}/benchmarks/gate.tsv"
    conda:
        "../envs/ckpt_migrate.yaml"
    params:
        allow_check_failures=config["allow_check_failures"],
    script:
        "../scripts/gate.py"


rule figures:
    input:
        csv=rules.report.output.csv,
    output:
        logit=report(
            f"{OUT}/figures/logit_check.png",
            caption="../report/logit_check.rst",
            category="Logit check",
        ),
        status=report(
            f"{OUT}/figures/status_by_lang_pair.png",
            caption="../report/status_by_lang_pair.rst",
            category="Overview",
        ),
        table=report(
            f"{OUT}/figures/report_table.html",
            caption="../report/report_csv.rst",
            category="Report",
            labels={"table": "all checkpoints (click a column to sort)"},
        ),
        attention=report(
            f"{OUT}/figures/needs_attention.html",
            caption="../report/needs_attention.rst",
            category="Report",
            labels={"table": "files that need a person"},
        ),
    log:
        f"{OUT}/logs/figures.log",
    benchmark:
        f"{OUT}/benchmarks/figures.tsv"
    conda:
        "../envs/ckpt_migrate.yaml"
    script:
        "../scripts/figures.py"
