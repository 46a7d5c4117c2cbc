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
        LAYOUT.job_log("report"),
    benchmark:
        LAYOUT.benchmark("report")
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
        flag=LAYOUT.report_ok,
    log:
        LAYOUT.job_log("gate"),
    benchmark:
        LAYOUT.benchmark("gate")
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
            LAYOUT.figures["logit"],
            caption="../report/logit_check.rst",
            category="Logit check",
        ),
        status=report(
            LAYOUT.figures["status"],
            caption="../report/status_by_lang_pair.rst",
            category="Overview",
        ),
        table=report(
            LAYOUT.figures["table"],
            caption="../report/report_csv.rst",
            category="Report",
            labels={"table": "all checkpoints (click a column to sort)"},
        ),
        validation=report(
            LAYOUT.figures["validation"],
            caption="../report/validation_loss.rst",
            category="Overview",
        ),
        attention=report(
            LAYOUT.figures["attention"],
            caption="../report/needs_attention.rst",
            category="Report",
            labels={"table": "files that need a person"},
        ),
    log:
        LAYOUT.job_log("figures"),
    benchmark:
        LAYOUT.benchmark("figures")
    conda:
        "../envs/ckpt_migrate.yaml"
    script:
        "../scripts/figures.py"
