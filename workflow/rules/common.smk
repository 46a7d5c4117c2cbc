# Config validation, the checkpoint list and every input function.
import glob as globlib
import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

import ckpt_migrate
from ckpt_migrate.pipeline import read_plan, read_report, summarize


validate(config, "../schemas/config.schema.yaml", set_default=True)

INPUT_ROOT = os.path.abspath(os.path.expanduser(config["input_root"]))
if not os.path.isdir(INPUT_ROOT):
    raise WorkflowError(
        f"input_root {INPUT_ROOT} does not exist or is not a folder "
        f"(set it in config/config.yaml or with --config input_root=PATH)"
    )
OUT = config["output_root"]
# The logit-check settings (check_batch, check_length, ...) as ckpt_migrate.check.CheckSettings takes them.
CHECK_SETTINGS = {key[len("check_"):]: value for key, value in config.items() if key.startswith("check_")}
CONVERTER_VERSION = ckpt_migrate.__version__


def _checkpoint_key(relative_path):
    """Wildcard value for a checkpoint: its path under input_root without the .pt suffix."""
    return relative_path[:-3] if relative_path.endswith(".pt") else relative_path


# Everything the glob matches, files or not: a directory or a broken link that matches is
# reported as unreadable rather than silently skipped.
SOURCES = {
    _checkpoint_key(os.path.relpath(path, INPUT_ROOT)): path
    for path in sorted(globlib.glob(os.path.join(globlib.escape(INPUT_ROOT), config["glob"])))
}
CHECKPOINTS = sorted(SOURCES)


def source_path(wildcards):
    return SOURCES[wildcards.ckpt]


def detect_input(wildcards):
    """The checkpoint file itself, so that a replaced file (newer mtime) is detected again.
    Not-a-file matches (directories, broken links) have no input and are detected once."""
    path = SOURCES[wildcards.ckpt]
    return [path] if os.path.isfile(path) else []


def manifest_path(ckpt):
    return f"{OUT}/manifests/{ckpt}.yaml"


def check_path(ckpt):
    return f"{OUT}/checks/{ckpt}.yaml"


def converted_path(wildcards):
    return f"{OUT}/converted/{wildcards.ckpt}.pt"


def report_inputs(wildcards):
    """All manifests, and a check record for each file the plan says to convert."""
    plan = checkpoints.plan.get().output.plan
    to_convert = [rel for rel, status in read_plan(plan) if status == "to_convert"]
    return {
        "plan": plan,
        "manifests": [manifest_path(c) for c in CHECKPOINTS],
        "checks": [check_path(c) for c in to_convert],
    }


def report_gate_flag():
    return f"{OUT}/report.ok"


def report_figures():
    return [f"{OUT}/figures/{name}" for name in ("logit_check.png", "status_by_lang_pair.png", "report_table.html", "needs_attention.html")]


def print_summary():
    report_csv = f"{OUT}/report.csv"
    if os.path.exists(report_csv):
        print(f"\nckpt-migrate report: {os.path.abspath(report_csv)}")
        print(summarize(read_report(report_csv)))
