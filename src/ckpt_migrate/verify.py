"""verify-outputs: every converted file against its check record, its hash and its source."""

from __future__ import annotations

import logging
import os


from .atomic import sha256_file
from .isolate import display_path
from .layout import OutputLayout
from .records import read_yaml
from .identity import identity_change

log = logging.getLogger(__name__)


def verify_outputs(output_root: str, recheck: bool = False, settings: dict | None = None) -> tuple[int, list[str]]:
    """Re-verify every converted file under ``output_root`` against its check record.

    Returns (files verified, problems): a converted file that is missing, whose sha256 differs
    from the one recorded at write time, that has no record, or (with ``recheck``) whose logits
    no longer match its source's.
    """
    from .fingerprint import converter_fingerprint

    current = converter_fingerprint()
    layout = OutputLayout(output_root)
    checks_dir, converted_dir = layout.checks_dir, layout.converted_dir
    problems: list[str] = []
    recorded: set[str] = set()
    verified = 0
    for folder, _, files in os.walk(checks_dir):
        for name in sorted(files):
            if not name.endswith(".yaml") or name.startswith("."):
                continue
            record_path = os.path.join(folder, name)
            record = read_yaml(record_path)
            if record.get("status") != "converted":
                continue
            rel = os.path.relpath(record_path, checks_dir)[: -len(".yaml")] + ".pt"
            path = os.path.join(converted_dir, rel)
            recorded.add(os.path.normpath(path))
            if not os.path.exists(path):
                problems.append(f"missing: {path} (recorded in {record_path}; delete that record and "
                                f"rerun with --forcerun plan to convert it again)")
                continue
            if not os.path.isfile(path):  # a FIFO would never end the read
                problems.append(f"not a file: {path} (recorded in {record_path}; remove it and rerun)")
                continue
            digest = sha256_file(path)
            if digest != record.get("sha256"):
                expected = str(record.get("sha256"))[:16]
                problems.append(f"changed: {path}: sha256 {digest[:16]}... != recorded {expected}... "
                                f"(delete {record_path} and rerun with --forcerun plan to convert it again)")
                continue
            source = (os.fsdecode(bytes.fromhex(record["source_path_hex"])) if record.get("source_path_hex")
                      else str(record.get("source", "")))
            change = identity_change(record.get("source_identity"), source)
            if change:
                problems.append(f"source changed: {display_path(source)} no longer matches {path} ({change}; "
                                f"rerun the pipeline to convert it again)")
                continue
            if record.get("converter_fingerprint") != current:
                problems.append(f"outdated: {path} was made by converter {record.get('converter_fingerprint') or '?'}, "
                                f"this one is {current} (rerun the pipeline to reconvert)")
                continue
            if recheck:
                from .check_settings import CheckSettings
                from .one_file import CheckpointError, check_file
                from .key_mapping import ConversionError

                # The source is the one our own record names, not a path read from the converted file.
                try:
                    result = check_file(path, CheckSettings(**(settings or {})), source=source)
                except (CheckpointError, ConversionError) as exc:  # a weight now non-finite, say
                    problems.append(f"recheck failed: {path}: {exc}")
                    continue
                if not result["check_passed"]:
                    problems.append(f"recheck failed: {path}: max |logit diff| {result['max_abs_logit_diff']:.3g}")
                    continue
            verified += 1
    for folder, _, files in os.walk(converted_dir):
        for name in files:
            path = os.path.normpath(os.path.join(folder, name))
            if name.endswith(".pt") and not name.startswith(".") and path not in recorded:
                problems.append(f"unrecorded: {path} has no converted check record")
    return verified, problems
