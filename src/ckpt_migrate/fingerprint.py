"""The converter's fingerprint: a hash of every module that decides a converted file's bytes or its check.

Recorded in every converted file and check record, and the ``convert`` rule's rerun trigger:
a change to any of these modules makes Snakemake redo every conversion, and ``verify-outputs``
names files made by another converter. Report, plotting and workflow code are not part of it,
so changing them redoes nothing. The detector's and the report's fingerprints do the same for
manifests and for the report's cached rows.
"""

from __future__ import annotations

import functools
import hashlib
import os

# Reading and loading (what is converted), layout tables and conversion, the models' forwards,
# the logit check, and the file format written (and how it is written).
READER_MODULES = ("safe_pickle.py", "pickle_machine.py", "pickle_input.py", "pickle_opcodes.py", "pickle_allowlist.py",
                  "pickle_checks.py", "pickle_torch.py", "pickle_numpy.py", "pickle_values.py")
CONVERTER_MODULES = (*READER_MODULES, "loader.py", "detect.py", "families.py", "forward_variant.py", "code_lines.py",
                     "key_mapping.py", "models.py", "check.py", "check_settings.py", "one_file.py",
                     "converted_format.py", "atomic.py", "identity.py")


# What decides a manifest: the reader, the classification, and the isolation around it.
DETECTOR_MODULES = (*READER_MODULES, "detect.py", "converted_format.py", "families.py", "forward_variant.py",
                    "code_lines.py", "isolate.py")


# What decides a report row from a manifest and a check record: the row code and the metric list.
REPORT_MODULES = ("report.py", "records.py", "identity.py", "metrics.py")


def converter_fingerprint() -> str:
    """16 hex characters of the sha256 over the converter modules' source, in a fixed order."""
    return _fingerprint(CONVERTER_MODULES)


def detector_fingerprint() -> str:
    """The same over the modules that decide a manifest (a changed reader redoes every detection)."""
    return _fingerprint(DETECTOR_MODULES)


def report_fingerprint() -> str:
    """The same over the code that makes report rows (cached rows made by other code are made again)."""
    return _fingerprint(REPORT_MODULES)


@functools.lru_cache(maxsize=None)  # the modules do not change under a running process
def _fingerprint(modules: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in modules:
        with open(os.path.join(here, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()[:16]
