"""Why a conversion did not finish: the SLURM job's state (sacct, else scontrol) and what its log
says.
"""

from __future__ import annotations

import logging
import os
import re


from .safe_pickle import one_line
from .layout import OutputLayout
from .records import read_yaml

log = logging.getLogger(__name__)


def unfinished_conversion_reason(layout: OutputLayout, key: str, work: str = "conversion") -> str:
    """Why a planned conversion (or ``work``: an evaluation) has no record: its job was killed (and
    how), or never ran."""
    attempt_path = layout.attempt(key)
    if not os.path.exists(attempt_path):
        return f"{work} did not run (the run stopped before it; the next run does it)"
    attempt = read_yaml(attempt_path)
    where = f"on {attempt.get('host', '?')}"
    job_id = str(attempt.get("slurm_job_id") or "")
    state = slurm_job_state(job_id) if job_id else ""
    if job_id:
        where += f" in SLURM job {job_id}" + (f" ({state})" if state else "")
    log_path = attempt.get("log") or layout.staged_log(key)
    return one_line(f"{work} started {where} but did not finish; log: {log_path}", 300)


# What a SLURM job's own log says when SLURM or the kernel stopped it.
_SLURM_LOG_SIGNS = (("Exceeded job memory limit", "exceeded its memory limit"), ("oom-kill", "killed for memory (OOM)"),
                    ("DUE TO TIME LIMIT", "hit its time limit"), ("DUE TO NODE FAILURE", "node failure"),
                    ("CANCELLED AT", "cancelled"))


def slurm_job_state(job_id: str) -> str:
    """A finished SLURM job's state (e.g. "OUT_OF_MEMORY", "CANCELLED") and what its log says, or "".

    sacct where the cluster keeps accounting; else scontrol, which knows a job for MinJobAge."""
    import subprocess

    if not re.fullmatch(r"\d+(_\d+)?", job_id):
        return ""
    state, log_path = "", ""
    for cmd in (["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"],
                ["scontrol", "-o", "show", "job", job_id]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if cmd[0] == "sacct":
            if out.strip():
                job_state, _, code = out.strip().splitlines()[0].partition("|")
                state = f"{job_state.strip()}, exit code {code.strip()}"
            continue
        fields = dict(item.partition("=")[::2] for item in out.split() if "=" in item)
        log_path = fields.get("StdOut", "")
        if fields.get("JobState") and not state:
            reason = fields.get("Reason", "None")
            state = (fields["JobState"] + (f", reason {reason}" if reason not in ("None", "") else "")
                     + f", exit code {fields.get('ExitCode', '?')}")
    return "; ".join(part for part in (state, _slurm_log_says(log_path)) if part)


def _slurm_log_says(path: str) -> str:
    """What the job's log says stopped it (SLURM writes these lines itself), or ""."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 65536))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return ", ".join(meaning for sign, meaning in _SLURM_LOG_SIGNS if sign in tail)
