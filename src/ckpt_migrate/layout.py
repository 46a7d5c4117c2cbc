"""Where a run reads and writes: the output layout, the guards that keep writes out of the tree,
and the matched checkpoints with their keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
from typing import Iterable


from .isolate import display_path

log = logging.getLogger(__name__)


class OutputLayout:
    """Where the pipeline writes each thing under ``output_root``, by checkpoint key (the one place
    the rules, ``verify-outputs`` and ``report`` take the layout from)."""

    def __init__(self, root: str):
        self.root = root
        self.manifests_dir = f"{root}/manifests"
        self.checks_dir = f"{root}/checks"
        self.converted_dir = f"{root}/converted"
        self.plan = f"{root}/plan.tsv"
        self.plan_log = self.job_log("plan")  # detection of every file happens in the plan job
        self.manifest_index = f"{self.manifests_dir}/.index.json"  # the plan's record of what each manifest describes
        self.report = f"{root}/report.csv"
        self.report_index = f"{root}/.report_index.json"  # the rows of report.csv and what each was read from
        self.report_ok = f"{root}/report.ok"  # the gate's flag: written only when no check failed (or that is allowed)
        # The HTML report's figures and tables (plots.write_report_figures takes them by these names).
        self.figures = {"logit": f"{root}/figures/logit_check.png",
                        "status": f"{root}/figures/status_by_lang_pair.png",
                        "table": f"{root}/figures/report_table.html",
                        "attention": f"{root}/figures/needs_attention.html",
                        "validation": f"{root}/figures/validation_loss.png"}

    def linked_folder(self, path: str) -> str:
        """The first folder between ``path`` and the written folder that holds it that is a link
        ("" if none): the start of a run refuses one, and a job checks again before it writes, since
        a run lasts hours. (A written folder itself may be a link, to a bigger disk.)"""
        tops = {f"{self.root}/{name}" for name in OUTPUT_FOLDERS}
        folder = os.path.dirname(path)
        while folder not in tops and folder != os.path.dirname(folder):
            if os.path.islink(folder):
                return folder
            folder = os.path.dirname(folder)
        return ""

    def job_log(self, job: str) -> str:
        """The log of a job that runs once per run (plan, report, figures, gate)."""
        return f"{self.root}/logs/{job}.log"

    def benchmark(self, job: str) -> str:
        """Snakemake's benchmark table of a job (``job`` may hold a wildcard: ``convert/{ckpt}``)."""
        return f"{self.root}/benchmarks/{job}.tsv"

    def manifest(self, key: str) -> str:
        return f"{self.manifests_dir}/{key}.yaml"

    def check(self, key: str) -> str:
        return f"{self.checks_dir}/{key}.yaml"

    def converted(self, key: str) -> str:
        return f"{self.converted_dir}/{key}.pt"

    def attempt(self, key: str) -> str:
        """Written when a conversion starts: where it runs (the SLURM job), for a report after a kill."""
        return f"{self.root}/attempts/{key}.yaml"

    def log(self, rule: str, key: str) -> str:
        return f"{self.root}/logs/{rule}/{key}.log"

    def batch(self, batch_id: str) -> str:
        """The summary a conversion job writes when every file of its batch has its record."""
        return f"{self.root}/batches/{batch_id}.yaml"

    def batch_log(self, batch_id: str) -> str:
        return f"{self.root}/logs/convert_batch/{batch_id}.log"

    def staged(self, key: str) -> str:
        """A file's check record as its conversion job writes it, the moment that file is done
        (the per-file ``convert`` rule publishes it as ``check(key)``)."""
        return f"{self.root}/staged/{key}.yaml"

    def staged_log(self, key: str) -> str:
        return f"{self.root}/staged/{key}.log"


# The folders under output_root that the pipeline writes into (OutputLayout's paths live in them).
OUTPUT_FOLDERS = ("manifests", "checks", "converted", "staged", "attempts", "batches", "logs", "figures",
                  "benchmarks")


def placement_problem(input_root: str, output_root: str, sources: Iterable[str] = ()) -> str:
    """Why writing to ``output_root`` could write into the tree at ``input_root`` ("" if it cannot):
    output_root inside the tree, the tree inside one of the folders the pipeline writes (a
    converted file's path mirrors its source's), a link into the tree among or below those
    folders, or a hard link to one of ``sources`` (the matched checkpoints) anywhere there.
    Links are resolved: the real places count."""
    tree, out = os.path.realpath(os.path.expanduser(input_root)), os.path.realpath(os.path.expanduser(output_root))
    if os.path.commonpath([out, tree]) == tree:
        return (f"output_root {out} is inside input_root {tree}: the checkpoint tree is only ever read "
                f"(set output_root elsewhere)")
    for name in OUTPUT_FOLDERS:
        folder = os.path.realpath(os.path.join(out, name))  # a folder there may be a link elsewhere
        if os.path.commonpath([tree, folder]) == folder:
            return (f"input_root {tree} is inside {folder}, where the pipeline writes: "
                    f"its outputs could land on the checkpoints (set output_root elsewhere)")
    return _link_into_tree(tree, out, _file_ids(sources))


def _file_ids(paths: Iterable[str]) -> dict[tuple[int, int], str]:
    """(device, inode) -> path of every regular file among ``paths`` (in this one process, the
    device number is a fair name for the filesystem)."""
    ids = {}
    for path in paths:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            ids[(st.st_dev, st.st_ino)] = path
    return ids


def _link_into_tree(tree: str, out: str, tree_files: dict[tuple[int, int], str]) -> str:
    """The first link into the tree that is one of the written folders (``converted`` made a link
    to the tree) or lies below one (``converted/<run>`` → a run directory, planted after a first
    run): what is written through it would land in the tree. The pipeline makes no links, so
    every one found is someone's."""
    def into_tree(path: str) -> bool:
        return os.path.commonpath([tree, os.path.realpath(path)]) == tree

    with contextlib.suppress(OSError):  # the files at the top (plan.tsv, report.csv, ...)
        for entry in os.scandir(out):
            problem = _entry_problem(entry, tree, tree_files, into_tree)
            if problem:
                return problem
    pending = []
    for name in OUTPUT_FOLDERS:
        top = os.path.join(out, name)  # may be a link elsewhere (a bigger disk): then walked there
        if os.path.islink(top) and into_tree(top):
            return _link_problem(top, tree)
        pending.append(top)
    # Snakemake writes its benchmarks through whatever is there; staged files are copied out
    # (their target's bytes would be copied): links in these two are named, not replaced.
    no_links_in = [os.path.join(out, "benchmarks"), os.path.join(out, "staged")]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:  # not there (yet), or not a folder: nothing below it
            continue
        for entry in entries:  # links below the top are checked, not followed
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
                continue
            problem = _entry_problem(entry, tree, tree_files, into_tree) or _folder_link_problem(entry)
            if not problem and any(os.path.commonpath([top, folder]) == top for top in no_links_in):
                problem = _read_back_link_problem(entry)
            if problem:
                return problem
    return ""


def _folder_link_problem(entry: os.DirEntry) -> str:
    """A link to a folder below a written folder (``converted/<run>`` -> a folder elsewhere): what
    the pipeline writes below it would replace the files there. (A written folder itself may be a
    link, to put the outputs on a bigger disk.)"""
    with contextlib.suppress(OSError):
        if entry.is_symlink() and entry.is_dir(follow_symlinks=True):
            return (f"{display_path(entry.path)} is a link to the folder {display_path(os.path.realpath(entry.path))}: "
                    f"the pipeline would write into it (remove the link)")
    return ""


def _read_back_link_problem(entry: os.DirEntry) -> str:
    """A link among the benchmarks (Snakemake writes its tables through it) or the staged files
    (copied out to logs/ and checks/, the file it names would be copied)."""
    with contextlib.suppress(OSError):
        if entry.is_symlink() or entry.stat(follow_symlinks=False).st_nlink > 1:
            return (f"{display_path(entry.path)} is a link (the run would write into or copy out the file it "
                    f"names): remove it")
    return ""


def _special_file_problem(entry: os.DirEntry) -> str:
    """A FIFO, socket or device (or a link to one) where the pipeline keeps files: opened to be
    read or written, a FIFO would wait for ever."""
    with contextlib.suppress(OSError):  # a dangling link: replaced like any file
        mode = os.stat(entry.path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
            return (f"{display_path(entry.path)} is {kind}{' through a link' if entry.is_symlink() else ''}, where "
                    f"the pipeline keeps files: remove it")
    return ""


def _entry_problem(entry: os.DirEntry, tree: str, tree_files: dict[tuple[int, int], str], into_tree) -> str:
    """A symlink into the tree, a hard link to a checkpoint of it (a file written there would
    be written into that checkpoint), or a FIFO or device."""
    special = _special_file_problem(entry)
    if special:
        return special
    if entry.is_symlink():
        return _link_problem(entry.path, tree) if into_tree(entry.path) else ""
    with contextlib.suppress(OSError):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and (st.st_dev, st.st_ino) in tree_files:
            return (f"{display_path(entry.path)} is a hard link to {display_path(tree_files[(st.st_dev, st.st_ino)])}: "
                    f"the pipeline writes there, and the checkpoint tree is only ever read (remove the link)")
    return ""


def _link_problem(link: str, tree: str) -> str:
    return (f"{display_path(link)} is a link into input_root {tree}: the pipeline writes there, "
            f"and the checkpoint tree is only ever read (remove the link)")


_RUN_DIR = re.compile(r"^(?P<lang>.+?)_owt_run_(?P<run>[^/]+)$")


def lang_and_run(relative_path: str) -> tuple[str, str]:
    """``eng_spa_owt_run_3/best_state_800`` -> ("eng_spa", "3"); ("", "") when the folder is named otherwise."""
    folder = relative_path.replace(os.sep, "/").split("/")[0]
    match = _RUN_DIR.match(folder)
    return (match.group("lang"), match.group("run")) if match else ("", "")


def glob_problem(pattern: str) -> str:
    """Why ``pattern`` could match outside input_root ("" if it cannot): absolute, or with a ``..``."""
    if os.path.isabs(pattern) or pattern.startswith("~"):
        return f"glob {pattern!r} must be relative to input_root (set input_root to the folder it starts from)"
    if ".." in pattern.replace(os.sep, "/").split("/"):
        return f"glob {pattern!r} climbs out of input_root with '..' (set input_root higher instead)"
    if pattern.endswith("/"):
        return f"glob {pattern!r} ends with '/': it would match folders, not checkpoint files (drop the '/')"
    return ""


# A key longer than this (a deep tree) is shortened, leaving room for output_root before it.
MAX_KEY_BYTES = 1024


def checkpoint_key(relative_path: str) -> str:
    """Wildcard value of a checkpoint: its path under input_root without the .pt suffix.

    Characters Snakemake cannot carry in a wildcard or a file name it writes are %-escaped:
    braces (its pattern syntax), %, control characters such as a newline, and bytes that are
    not UTF-8. A folder or file name too long to carry a .yaml or temporary suffix, or a whole
    path too long to sit under output_root, is shortened with a hash, so every path the glob
    finds gets a key (and a row)."""
    stem = relative_path[:-3] if relative_path.endswith(".pt") else relative_path
    escaped = "".join(
        f"%{ord(ch) - 0xDC00:02X}" if 0xDC80 <= ord(ch) <= 0xDCFF
        else f"%{ord(ch):02X}" if ch in "%{}" or ord(ch) < 32 or ord(ch) == 127
        else ch
        for ch in stem
    )
    parts = [_short_name(part, 180) for part in escaped.split("/")]
    if len(os.fsencode("/".join(parts))) > MAX_KEY_BYTES:
        digest = hashlib.sha256(os.fsencode(relative_path)).hexdigest()[:16]
        parts = ["long_paths", f"{digest}_{_short_name(parts[-1], 120)}"]
    return "/".join(parts)


def _short_name(part: str, limit: int) -> str:
    if len(os.fsencode(part)) <= limit:
        return part
    digest = hashlib.sha256(os.fsencode(part)).hexdigest()[:16]
    return f'{os.fsencode(part)[:limit - 60].decode("utf-8", "ignore")}~{digest}'


def checkpoint_sources(input_root: str, pattern: str) -> dict[str, str]:
    """{key: path} for every match of ``pattern`` under ``input_root``, files or not; two paths
    whose keys coincide (``x.pt`` and ``x``) both keep a row."""
    problem = glob_problem(pattern)
    if problem:
        raise ValueError(problem)
    keyed: dict[str, str] = {}
    for path in sorted(glob_matches(input_root, pattern)):
        key = checkpoint_key(os.path.relpath(path, input_root))
        if key in keyed:
            key = f"{key}~{hashlib.sha256(os.fsencode(path)).hexdigest()[:12]}"
        keyed[key] = path
    return keyed


def glob_matches(input_root: str, pattern: str) -> list[str]:
    """What ``glob.glob(os.path.join(input_root, pattern))`` matches, also where the path is longer
    than PATH_MAX (there glob finds nothing, silently): each folder is opened relative to its
    parent's descriptor, so no call is given the whole path. The same rules as glob: names that
    start with a dot only match a part that does; folders are followed through links; the last
    part matches anything that exists, broken links included."""
    try:
        root_fd = os.open(input_root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return []
    try:
        return list(_matches_below(root_fd, input_root, [p for p in pattern.split("/") if p]))
    finally:
        os.close(root_fd)


def _matches_below(dir_fd: int, path: str, parts: list[str]):
    import fnmatch
    import glob

    part, last = parts[0], len(parts) == 1
    if glob.has_magic(part):
        try:
            names = sorted(entry.name for entry in os.scandir(dir_fd)
                           if fnmatch.fnmatchcase(entry.name, part) and (part[0] == "." or entry.name[0] != "."))
        except OSError:
            return
    else:
        names = [part]
    for name in names:
        if last:
            with contextlib.suppress(OSError):
                os.lstat(name, dir_fd=dir_fd)
                yield os.path.join(path, name)
            continue
        try:
            child_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
        except OSError:
            continue  # not a folder, or not one we may list
        try:
            yield from _matches_below(child_fd, os.path.join(path, name), parts[1:])
        finally:
            os.close(child_fd)


def not_read_because(path: str, input_root: str, follow_links: bool) -> str:
    """Why the match at ``path`` is not opened ("" if it is read): a path the system cannot take
    whole, or (unless ``follow_links``) a link that leaves the tree."""
    size = len(os.fsencode(path))
    if size >= PATH_MAX:
        return (f"its path is {size:,} bytes, over the system's limit of {PATH_MAX - 1:,} (PATH_MAX): "
                f"not read (move it to a shorter path)")
    return "" if follow_links else link_outside(path, input_root)


PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096


def link_outside(path: str, input_root: str) -> str:
    """Why ``path`` is not read: it resolves outside ``input_root`` through a symlink ("" if not)."""
    tree, real = os.path.realpath(input_root), os.path.realpath(path)
    if os.path.commonpath([tree, real]) == tree or not os.path.exists(real):
        return ""  # inside, or a broken link (the reader says so, reading nothing)
    return (f"a link to {display_path(real)}, outside input_root: not read (set follow_links: true to read "
            f"links that leave the tree)")
