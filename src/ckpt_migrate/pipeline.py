"""The run over the whole tree, step by step: what the workflow's one-call scripts call.

A run detects every new or changed file (each in a budgeted child, no torch, all in one job:
:mod:`.plan`), plans which small files to convert and in which batches, converts a batch in one
process writing each file's record the moment it is done (:mod:`.batch`), and reports every
matched path, also after a failed or killed job (:mod:`.report`, :mod:`.slurm`). Each job's
inputs and outputs sit in one :class:`~.layout.OutputLayout` under ``output_root``; every output
is written atomically, and nothing is ever written under the input root (:mod:`.layout`). A
rerun reuses what still describes a file as it is now (:func:`~.identity.file_identity`, the
code's fingerprint, the run's settings) and redoes only the rest. ``verify-outputs``:
:mod:`.verify`. This module only gathers the steps' entry points in one place.
"""

from .batch import run_batch, run_conversion, standing_conversion
from .layout import (OUTPUT_FOLDERS, OutputLayout, checkpoint_key, checkpoint_sources, glob_problem, link_outside,
                     not_read_because, placement_problem)
from .plan import (DEFAULT_CONVERSIONS_PER_JOB, age_out_of_date_plan, batch_minutes, detect_and_plan, read_batches,
                   read_plan, write_manifest)
from .records import is_from_the_future, job_logging, read_yaml, source_identities, write_yaml
from .identity import file_identity
from .report import (NEEDS_A_PERSON, REPORT_COLUMNS, check_gate, read_report, report_after_failure, summarize,
                     write_report)
from .verify import verify_outputs

__all__ = ["DEFAULT_CONVERSIONS_PER_JOB", "NEEDS_A_PERSON", "OUTPUT_FOLDERS", "OutputLayout", "REPORT_COLUMNS",
           "age_out_of_date_plan", "batch_minutes", "check_gate", "checkpoint_key", "checkpoint_sources",
           "detect_and_plan", "file_identity",
           "glob_problem", "is_from_the_future", "job_logging", "link_outside", "not_read_because",
           "placement_problem", "read_batches",
           "read_plan", "read_report", "read_yaml", "report_after_failure", "run_batch", "run_conversion",
           "source_identities", "standing_conversion", "summarize", "verify_outputs", "write_manifest",
           "write_report", "write_yaml"]
