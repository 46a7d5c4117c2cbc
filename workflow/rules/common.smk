# Config validation, the checkpoint list and every input function.
import os
import re

import yaml

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from ckpt_migrate import output_lock
from ckpt_migrate.atomic import remove_temporaries
from ckpt_migrate.fingerprint import converter_fingerprint, detector_fingerprint
from ckpt_migrate.plan import CONVERT_JOB_RESOURCES
from ckpt_migrate.layout import lang_and_run
from ckpt_migrate.validation import validation_plan
from ckpt_migrate.pipeline import (
    age_out_of_date_plan,
    OUTPUT_FOLDERS,
    OutputLayout,
    batch_minutes,
    checkpoint_sources,
    glob_problem,
    is_from_the_future,
    not_read_because,
    placement_problem,
    read_batches,
    read_plan,
    read_report,
    report_after_failure,
    source_identities,
    summarize,
)


def _check_section(config):
    """The config made ready for the schema: the flat check_ keys of earlier versions are refused
    by name, and values given on the command line (--config 'check={length: 1024}',
    follow_links=true), which Snakemake passes on as strings, are read as YAML scalars.
    """
    flat = sorted(key for key in config if key.startswith("check_"))
    if flat:
        raise WorkflowError(
            f"config keys {', '.join(flat)} are now under check: (e.g. check: {{length: 2048}}; "
            f"on the command line --config 'check={{length: 2048}}')"
        )
    # --config follow_links=true reaches here as the string "true"
    for name in ("follow_links", "allow_check_failures"):
        if isinstance(config.get(name), str):
            config[name] = _scalar(config[name])
    for name in ("check", "validation"):
        section = config.get(name)
        if isinstance(section, dict):
            config[name] = {
                key: _command_line_value(key, value) for key, value in section.items()
            }


def _command_line_value(key, value):
    """A section's value as typed: numbers read as YAML; a path (validation: data) kept as
    written, but for the words that mean "none" (null, ~), which turn validation off."""
    if not isinstance(value, str):
        return value
    if key == "data":
        return None if value.strip() in ("", "null", "Null", "NULL", "~") else value
    return _scalar(value)


def _scalar(text):
    """A command-line value as YAML reads it, and 1e-3 as a number (YAML 1.1 wants 1.0e-3)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # the schema says what is wrong with it
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


_check_section(config)
validate(config, "../schemas/config.schema.yaml", set_default=True)

INPUT_ROOT = os.path.abspath(os.path.expanduser(config["input_root"]))
if not os.path.isdir(INPUT_ROOT):
    raise WorkflowError(
        f"input_root {INPUT_ROOT} does not exist or is not a folder "
        f"(set it in config/config.yaml or with --config input_root=PATH)"
    )
OUT = config["output_root"]
if glob_problem(config["glob"]):
    raise WorkflowError(glob_problem(config["glob"]))
# Everything the glob matches, files or not: a directory, FIFO or broken link that matches is
# reported as unreadable rather than silently skipped.
SOURCES = checkpoint_sources(INPUT_ROOT, config["glob"])
_problem = placement_problem(INPUT_ROOT, OUT, SOURCES.values())
if _problem:
    raise WorkflowError(_problem)
LAYOUT = OutputLayout(OUT)
# Snakemake's own records of the plan's params live in this checkout, for this very path: from
# another checkout (or through a link) a file replaced with its mtime kept must still replan.
age_out_of_date_plan(SOURCES, LAYOUT)
# The logit-check settings, as ckpt_migrate.check.CheckSettings takes them.
CHECK_SETTINGS = lookup(dpath="check", within=config)
# Rerun triggers: every conversion (detection) is redone when the code that decides it changes.
CONVERTER_FINGERPRINT = converter_fingerprint()
DETECTOR_FINGERPRINT = detector_fingerprint()
# What the lab states for this run, over what is read from the files (null: read from each file).
OVERRIDES = {key: config[key] for key in ("eot_token", "num_iterations")}


CHECKPOINTS = sorted(SOURCES)
# Matches that are never opened, with the reason: a path over PATH_MAX, or (unless follow_links)
# one that resolves outside input_root.
NOT_READ = {
    key: why
    for key, path in SOURCES.items()
    if (why := not_read_because(path, INPUT_ROOT, config["follow_links"]))
}
RELATIVE_PATHS = {
    key: os.path.relpath(path, INPUT_ROOT) for key, path in SOURCES.items()
}
# What each language pair's validation loss is computed on (its shard, as it is now): a changed
# setting or shard reruns the plan, which gives only the files it concerns a new job.
VALIDATION_SHARDS = {
    lang: validation_plan(config["validation"], lang)
    for lang in sorted({lang_and_run(rel)[0] for rel in RELATIVE_PATHS.values()})
}


def _as_input(path):
    """The path as a rule input, or nothing where Snakemake would read part of it as a wildcard
    ("{name}" has no escape in input files), or that holds a line break or bytes that are not
    UTF-8 (its lock file cannot hold them): a change to such a file is seen when the plan runs
    for another reason (or with --forcerun plan), not by its mtime."""
    return [] if NOT_AN_INPUT.search(path) else [path]


NOT_AN_INPUT = re.compile(r"\{\s*[.\w]+|[\x00-\x1f\x7f\udc80-\udcff]")


def detect_inputs():
    """Every match that is a file Snakemake can carry as an input. Not one modified in the future
    (Snakemake would refuse to order it: its row says so). What reruns the plan is the params:
    the list of matches and each one's identity, so a file replaced with an older mtime
    (mv, cp -p, rsync -a, touch -r) is detected again too."""
    return [
        p
        for path in SOURCES.values()
        if os.path.isfile(path) and not is_from_the_future(path)
        for p in _as_input(path)
    ]


def _plan_batches():
    """{batch: {key: source}} from the plan, read once per plan version (input functions run per job)."""
    plan = checkpoints.plan.get().output.plan
    stamp = (plan, os.stat(plan).st_mtime_ns)
    if _BATCHES.get("stamp") != stamp:
        batches = read_batches(plan)
        _BATCHES.update(
            stamp=stamp,
            batches=batches,
            batch_of={
                key: batch for batch, members in batches.items() for key in members
            },
        )
    return _BATCHES


_BATCHES = {}


def batch_summary(wildcards):
    """The summary of the conversion job whose batch holds this checkpoint."""
    return LAYOUT.batch(_plan_batches()["batch_of"][wildcards.ckpt])


def batch_runtime(wildcards):
    """Minutes for a conversion job: start-up, then each file of its batch."""
    return batch_minutes(len(_plan_batches()["batches"].get(wildcards.batch, ())))


def report_inputs(wildcards):
    """The plan, and a check record for each file it gives a job (to convert, or to evaluate)."""
    plan = checkpoints.plan.get().output.plan
    return {
        "plan": plan,
        "checks": [LAYOUT.check(key) for key, _, batch in read_plan(plan) if batch],
    }


_RUN = {"holds_lock": False}


def start_run():
    """onstart: take output_root for this run (a second checkout's run refuses), then remove the
    temporaries that killed jobs of earlier runs left in the folders it writes."""
    try:
        output_lock.acquire(OUT)
    except output_lock.OutputInUse as exc:
        raise WorkflowError(str(exc))
    _RUN["holds_lock"] = True
    remove_temporaries(OUT, OUTPUT_FOLDERS)


def finish_run():
    """onsuccess: the summary, and output_root free for the next run."""
    print_summary()
    output_lock.release(OUT)


def report_after_error():
    """onerror: a failed job (a crash, a SLURM kill) still leaves a full report and its figures
    (not when another run holds output_root: its outputs are its own)."""
    if not _RUN["holds_lock"]:
        return
    try:
        report_after_failure(LAYOUT, RELATIVE_PATHS)
        from ckpt_migrate.plots import write_report_figures

        write_report_figures(LAYOUT.report, **LAYOUT.figures)
    except (
        Exception
    ) as exc:  # the run is failing already; say why the report is missing too
        print(f"ckpt-migrate: could not write the report after the failure: {exc}")
    print_summary()
    output_lock.release(OUT)


def print_summary():
    report_csv = LAYOUT.report
    if os.path.exists(report_csv):
        print(f"\nckpt-migrate report: {os.path.abspath(report_csv)}")
        print(summarize(read_report(report_csv)))
    missing = [
        lang or "(no language pair)"
        for lang, found in VALIDATION_SHARDS.items()
        if found is None
    ]
    if config["validation"]["data"] and missing:
        print(
            f"validation: no shard matches {config['validation']['data']!r} for "
            f"{', '.join(missing)}: their files get no val_loss"
        )
