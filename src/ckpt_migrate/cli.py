"""``ckpt-migrate``: inspect, convert and check checkpoints from the shell.

Exit codes: 0 ok, 1 a check failed or a file could not be converted, 2 bad usage.
Bad input is reported as one line naming the file, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, fields

from .check_settings import CheckDeviceError, CheckSettings
from .records import LOG_FORMAT
from .converted_format import FORMAT as CONVERTED_FORMAT
from .detect import FORMAT_LABELS
from .isolate import DEFAULT_MEMORY_MB, DEFAULT_SECONDS, detect_isolated
from .metrics import CHECK_FIELDS, VALIDATION_FIELDS

VAL_TOKENS, VAL_SEQUENCE_LENGTH = 1 << 20, 2048  # the config's defaults (workflow/schemas/config.schema.yaml)

SHOWN_FIELDS = ("variant", "reason", "num_layers", "num_heads", "head_dim", "model_dim", "mlp_dim",
                "vocab_size", "padded_vocab", "layers_without_attention", "num_value_embeds", "params",
                "weight_bytes", "size_bytes", "step", "has_optimizer_state", "long_window_blocks",
                "window_source", "eot_token", "eot_token_source", "num_iterations", "num_iterations_source", "notes",
                "direct_load", "dtypes", "converted_from", "pickle_protocol", "pickle_objects")


def format_label(record: dict) -> str:
    fmt = record["format"]
    if fmt in FORMAT_LABELS:
        return FORMAT_LABELS[fmt]
    if fmt == CONVERTED_FORMAT:
        return f"{CONVERTED_FORMAT} (converted from {FORMAT_LABELS.get(record.get('converted_from'), '?')})"
    return fmt


def _inspect_text(record: dict) -> str:
    lines = [f"Format: {format_label(record)}", f"  {'path':<26} {record['path']}"]
    for key in SHOWN_FIELDS:
        if key in record and record[key] not in ("", None, [], {}):
            value = record[key]
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, list):
                value = ", ".join(map(str, value))
            lines.append(f"  {key:<26} {value}")
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    records = [detect_isolated(p, args.seconds, args.memory_mb, _overrides(args)) for p in args.paths]
    if args.json:
        if not args.tensors:
            for r in records:
                r.pop("tensors", None)
        print(json.dumps(records if len(records) > 1 else records[0], indent=2, default=str))
    else:
        print("\n\n".join(_inspect_text(r) for r in records))
    return 0 if all(r["format"] in (*FORMAT_LABELS, CONVERTED_FORMAT) for r in records) else 1


def _settings(args):
    """The check settings the options give (the options are CheckSettings' fields, by name)."""
    return CheckSettings(**{f.name: getattr(args, f.name) for f in fields(CheckSettings)})


def _overrides(args) -> dict:
    return {"eot_token": args.eot_token, "num_iterations": args.num_iterations}


def _add_override_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eot-token", type=int, default=None,
                   help="document separator id, over what the file's code says (default: read from the file)")
    p.add_argument("--num-iterations", type=int, default=None,
                   help="training length for the attention windows (default: read from the file)")


def _print_check(result: dict) -> None:
    for key in ("status", "reason", *CHECK_FIELDS, *VALIDATION_FIELDS, "sha256"):
        if key in result and result[key] not in ("", None):
            print(f"  {key:<20} {result[key]}")


def cmd_convert(args) -> int:
    from .one_file import convert_file

    result = convert_file(args.src, args.dst, _settings(args), _overrides(args))
    print(f"{args.src} -> {args.dst}: {result['status']}")
    _print_check(result)
    return 0 if result["status"] == "converted" else 1


def cmd_check(args) -> int:
    from .key_mapping import ConversionError
    from .one_file import CheckpointError, check_file

    from .validation import held_out_file

    try:
        given = {"tokens": args.val_tokens, "sequence_length": args.val_sequence_length}
        if not args.val_data and any(v is not None for v in given.values()):
            raise ValueError("--val-tokens and --val-sequence-length need --val-data FILE")
        defaults = {"tokens": VAL_TOKENS, "sequence_length": VAL_SEQUENCE_LENGTH}
        given = {k: defaults[k] if v is None else v for k, v in given.items()}
        validation = held_out_file(args.val_data, **given) if args.val_data else None
        result = check_file(args.path, _settings(args), source=args.source, validation=validation)
    except (CheckpointError, ConversionError, CheckDeviceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.path}: check {'passed' if result['check_passed'] else 'FAILED'}")
    _print_check(result)
    if result.get("val_error"):
        print(f"error: {result['val_error']}", file=sys.stderr)
        return 1
    return 0 if result["check_passed"] else 1


def cmd_verify_outputs(args) -> int:
    from .layout import OutputLayout
    from .verify import verify_outputs

    layout = OutputLayout(args.output_root)
    if not (os.path.exists(layout.plan) or os.path.exists(layout.report)):
        # A mistyped path or the input tree would otherwise "verify" with nothing to find.
        print(f"error: {args.output_root} is not the output_root of a run (no {os.path.basename(layout.plan)} "
              f"or {os.path.basename(layout.report)} there)", file=sys.stderr)
        return 2
    verified, problems = verify_outputs(args.output_root, recheck=args.recheck, settings=asdict(_settings(args)))
    for line in problems:
        print(line)
    print(f"{verified} converted file(s) match their records; {len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_report(args) -> int:
    from .layout import OutputLayout
    from .report import read_report, summarize

    path = OutputLayout(args.output_root).report
    if not os.path.exists(path):
        print(f"error: {path} does not exist (has the pipeline run on this output folder?)", file=sys.stderr)
        return 2
    print(f"report: {os.path.abspath(path)}")
    print(summarize(read_report(path)))
    return 0


def cmd_doctor(args) -> int:
    from .doctor import run_doctor

    findings = run_doctor(args.profile, args.workflow_profile, args.configfile, args.config or [],
                          do_probe=args.probe, local=args.local)
    for finding in findings:
        print(finding.line())
    failed = sum(f.level == "FAIL" for f in findings)
    warned = sum(f.level == "warn" for f in findings)
    print(f"{len(findings)} checks: {failed} FAIL, {warned} warn")
    return 1 if failed else 0


def cmd_demo_tree(args) -> int:
    from .synthetic import make_demo_tree

    for path in make_demo_tree(args.root):
        print(path)
    return 0


def _add_check_options(p: argparse.ArgumentParser) -> None:
    """The check's options, with CheckSettings' defaults (the pipeline's schema has the same)."""
    default = {f.name: f.default for f in fields(CheckSettings)}
    p.add_argument("--batch", type=int, default=default["batch"],
                   help=f"sequences per check batch (default: {default['batch']})")
    p.add_argument("--length", type=int, default=default["length"],
                   help=f"tokens per sequence (default: {default['length']})")
    p.add_argument("--seed", type=int, default=default["seed"],
                   help=f"token generator seed (default: {default['seed']})")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=default["dtype"],
                   help=f"(default: {default['dtype']})")
    p.add_argument("--tolerance", type=float, default=default["tolerance"], help="max |logit diff| (default: by dtype)")
    p.add_argument("--device", default=default["device"],
                   help=f"cpu, cuda, cuda:N or auto (default: {default['device']})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckpt-migrate", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="detect format and shapes without loading (no torch)")
    p.add_argument("paths", nargs="+")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tensors", action="store_true", help="with --json: list every tensor")
    p.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                   help=f"time budget per file (default: {DEFAULT_SECONDS:g})")
    p.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_MB,
                   help=f"memory budget per file in MB (default: {DEFAULT_MEMORY_MB})")
    _add_override_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="convert a small checkpoint to GPTBatched, check, write atomically")
    p.add_argument("src")
    p.add_argument("dst")
    _add_check_options(p)
    _add_override_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("check", help="logit check of a small, medium or converted checkpoint")
    p.add_argument("path")
    p.add_argument("--source", help="for a converted file: the small checkpoint it was converted from")
    p.add_argument("--val-data", metavar="FILE", help="a modded-nanogpt .bin token shard: the check also runs on "
                   "its tokens, then the validation loss is computed")
    p.add_argument("--val-tokens", type=int, metavar="N",
                   help=f"predictions the validation loss is the mean over (default: {VAL_TOKENS})")
    p.add_argument("--val-sequence-length", type=int, metavar="T",
                   help=f"input tokens per validation sequence (default: {VAL_SEQUENCE_LENGTH})")
    _add_check_options(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("verify-outputs", help="recheck converted files against their records and hashes")
    p.add_argument("output_root")
    p.add_argument("--recheck", action="store_true", help="also rerun the logit check against each source")
    _add_check_options(p)
    p.set_defaults(func=cmd_verify_outputs)

    p = sub.add_parser("report", help="print the summary of an existing run's report.csv")
    p.add_argument("output_root")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("doctor", help="check the cluster, profile and config before a run (ok/warn/FAIL lines)")
    p.add_argument("--profile", help="Snakemake profile folder, e.g. profiles/slurm")
    p.add_argument("--workflow-profile", help="a second profile whose keys replace the first's (as in Snakemake)")
    p.add_argument("--configfile", default="config/config.yaml", help="workflow config (default: config/config.yaml)")
    p.add_argument("--config", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, as snakemake --config takes them")
    p.add_argument("--probe", action="store_true",
                   help="submit one short job to the conversion partition and report it")
    p.add_argument("--local", action="store_true", help="run the probe here instead of through SLURM")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("demo-tree", help="write the built-in demo checkpoint tree")
    p.add_argument("root")
    p.set_defaults(func=cmd_demo_tree)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=LOG_FORMAT)
    try:
        return args.func(args)
    except Exception as exc:  # bad input (a damaged record, a missing folder): one line, never a traceback
        if args.verbose:
            raise
        from .pickle_values import one_line

        print(f"error: {one_line(f'{type(exc).__name__}: {exc}', 300)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
