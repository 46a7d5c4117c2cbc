"""``ckpt-migrate doctor``: check the cluster, the profile and the config before the first run.

Each check prints one line, ``ok``, ``warn`` or ``FAIL``, with what to change when it is not
``ok``. It reads the Snakemake profile (``--profile``, and ``--workflow-profile`` on top, as
Snakemake does) and the workflow config (``--configfile``, ``--config key=value``), and asks
SLURM what it has: partitions, their nodes' CPUs, memory and GPUs, time limits, the user's
accounts, the job-status command. ``--probe`` submits one short job to the conversion partition
with the profile's settings and reports what it saw there (host, GPU, torch and CUDA start-up);
``--local`` runs the same probe in this process. The exit status is 1 if any check FAILs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import yaml

# The rule of the conversion jobs, and what it asks for when the profile does not say
# (workflow/rules/convert.smk; its runtime grows with the files per job, see conversion_request).
CONVERT_RULE = "convert_batch"
NODE_LOCAL = ("/tmp", "/dev/shm", "/var/tmp", "/run")
PROBE_CODE = r"""
import json, socket, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
info = {"host": socket.gethostname(), "torch": torch.__version__, "torch_import_s": round(t1 - t0, 2),
        "cuda_available": torch.cuda.is_available()}
if info["cuda_available"]:
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    info.update(gpu=torch.cuda.get_device_name(0), cuda_init_s=round(time.perf_counter() - t1, 2))
print("CKPT_MIGRATE_PROBE " + json.dumps(info))
"""


@dataclass
class Finding:
    level: str  # "ok", "warn" or "FAIL"
    what: str  # the check, and what it found
    fix: str = ""  # what to change, when not ok

    def line(self) -> str:
        return f"{self.level:<4}  {self.what}" + (f" -> {self.fix}" if self.fix else "")


# --- reading the profile and config the way Snakemake would --------------------------------

def load_profile(profile: str | None, workflow_profile: str | None) -> dict:
    merged: dict = {}
    for folder in (profile, workflow_profile):
        if folder:
            merged.update(_yaml_mapping(os.path.join(folder, "config.yaml")))  # later keys win, as in Snakemake
    return merged


def load_config(configfile: str, overrides: list[str]) -> dict:
    from .records import yaml_problem

    config = _yaml_mapping(configfile)
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            config[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"--config {key}=...: the value is {yaml_problem(exc)}") from None
    return config


def _yaml_mapping(path: str) -> dict:
    """The mapping in the YAML file at ``path`` ({} if empty); ValueError naming the file if it is
    not a regular file, not UTF-8, not YAML or not a mapping."""
    from .records import require_regular_file, yaml_problem

    try:
        require_regular_file(path)
        with open(path, encoding="utf-8") as f:
            value = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}" if exc.strerror else str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is {yaml_problem(exc)}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a mapping of settings")
    return value


def conversion_request(profile: dict, config: dict | None = None) -> dict:
    """The resources one conversion job (a full batch) asks SLURM for, with this profile and config."""
    from .plan import CONVERT_JOB_RESOURCES, DEFAULT_CONVERSIONS_PER_JOB, batch_minutes

    per_job = int((config or {}).get("conversions_per_job") or DEFAULT_CONVERSIONS_PER_JOB)
    # Snakemake's precedence: default-resources, then the rule's own, then set-resources.
    request = {**(profile.get("default-resources") or {}), **CONVERT_JOB_RESOURCES,
               "runtime": batch_minutes(per_job),
               **((profile.get("set-resources") or {}).get(CONVERT_RULE) or {})}
    request["gpu"] = (profile.get("resources") or {}).get("gpu", request["gpu"])
    return request


# --- SLURM -----------------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None


def _minutes(limit: str) -> float:
    """A SLURM time limit (``1-02:03:04``, ``30:00``, ``45``, ``INFINITE``) in minutes."""
    if limit.upper() in ("INFINITE", "UNLIMITED", "") or not limit[:1].isdigit():
        return float("inf")
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts
    return int(days or 0) * 1440 + h * 60 + m + s / 60


def _partitions() -> dict[str, dict]:
    out = _run(["sinfo", "-h", "-N", "-o", "%P|%N|%a|%t|%c|%m|%G|%l"])
    partitions: dict[str, dict] = {}
    for line in (out.stdout.splitlines() if out and out.returncode == 0 else []):
        name, node, avail, state, cpus, mem, gres, limit = line.split("|")
        part = partitions.setdefault(name.rstrip("*"), {"avail": avail, "limit": limit, "nodes": []})
        part["nodes"].append({"name": node, "state": state, "cpus": int(cpus), "mem_mb": int(mem.rstrip("+")),
                              "gpus": "gpu" in gres})
    return partitions


def slurm_findings(profile: dict, config: dict | None = None) -> list[Finding]:
    found: list[Finding] = []
    missing = [c for c in ("sbatch", "squeue", "sinfo", "scontrol") if not shutil.which(c)]
    if missing:
        return [Finding("FAIL", f"SLURM commands not found: {', '.join(missing)}",
                        "run on the cluster's login node, or load its slurm module")]
    partitions = _partitions()
    if not partitions:
        return [Finding("FAIL", "sinfo lists no partitions (is slurmctld reachable?)", "check `sinfo` by hand")]
    found.append(Finding("ok", f"SLURM reachable: partitions {', '.join(sorted(partitions))}"))
    request = conversion_request(profile, config)
    # Only the partition jobs use: every rule but convert_batch is local, so the profile's default
    # partition is used by none and need not exist.
    for role, name in (("conversion", request.get("slurm_partition")),):
        if not name:
            continue
        part = partitions.get(name)
        if part is None:
            found.append(Finding("FAIL", f"{role} partition {name!r} does not exist",
                                 f"set slurm_partition to one of {', '.join(sorted(partitions))} in the profile"))
        elif part["avail"] != "up":
            found.append(Finding("FAIL", f"{role} partition {name!r} is {part['avail']}",
                                 "ask the admins, or pick another"))
        else:
            found.append(Finding("ok", f"{role} partition {name!r} is up"))
    conversion = partitions.get(request.get("slurm_partition") or "")
    if conversion and conversion["avail"] == "up":
        found += _fit_findings(request, conversion)
    found.append(_account_finding(profile))
    found.append(_status_finding(profile))
    return found


def _fit_findings(request: dict, part: dict) -> list[Finding]:
    name = request["slurm_partition"]
    cpus, mem = int(request.get("cpus_per_task", 1)), int(request.get("mem_mb", 0))
    wants_gpu = int(request.get("gpu", 0) or 0) > 0 or "gpu" in str(request.get("gres", ""))
    found = []
    if wants_gpu and not any(n["gpus"] for n in part["nodes"]):
        found.append(Finding("FAIL", f"conversion partition {name!r} has no node with GPUs (gres)",
                             f"set set-resources: {CONVERT_RULE}: slurm_partition to the GPU partition"))
    usable = [n for n in part["nodes"] if n["gpus"] or not wants_gpu]
    fits = [n for n in usable if n["cpus"] >= cpus and n["mem_mb"] >= mem]
    if usable and not fits:
        biggest = max(usable, key=lambda n: (n["mem_mb"], n["cpus"]))
        found.append(Finding("FAIL", f"no node in {name!r} fits a conversion job ({cpus} CPUs, {mem} MB); "
                                     f"the largest has {biggest['cpus']} CPUs, {biggest['mem_mb']} MB",
                             f"lower cpus_per_task / mem_mb under set-resources: {CONVERT_RULE} "
                             f"(the job would pend for ever)"))
    elif fits:
        found.append(Finding("ok", f"{len(fits)} node(s) in {name!r} fit a conversion job ({cpus} CPUs, {mem} MB"
                                   + (", a GPU)" if wants_gpu else ")")))
    runtime = float(request.get("runtime", 0))
    if runtime > _minutes(part["limit"]):
        found.append(Finding("FAIL", f"conversion runtime {runtime:g} min exceeds {name!r}'s limit {part['limit']}",
                             "lower conversions_per_job in the config (each file adds 5 minutes)"))
    return found


def _account_finding(profile: dict) -> Finding:
    account = (profile.get("default-resources") or {}).get("slurm_account")
    if not account:
        return Finding("ok", "no slurm_account set (jobs go to your default account)")
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
    out = _run(["sacctmgr", "-n", "-P", "show", "assoc", f"user={user}", "format=account"])
    if out is None or out.returncode != 0:
        return Finding("warn", f"cannot query accounts to check {account!r} (no accounting?)",
                       "check `sacctmgr show assoc user=$USER`; the SLURM plugin validates the account too")
    accounts = {a.strip().lower() for a in out.stdout.split()}
    if account.lower() not in accounts:
        return Finding("FAIL", f"account {account!r} is not one of yours ({', '.join(sorted(accounts)) or 'none'})",
                       "set default-resources: slurm_account in the profile")
    return Finding("ok", f"account {account!r} is yours")


def _status_finding(profile: dict) -> Finding:
    command = profile.get("slurm-status-command")
    sacct = _run(["sacct", "-n", "-X", "-j", "1", "-o", "State"])
    sacct_works = sacct is not None and sacct.returncode == 0 and "disabled" not in sacct.stderr
    if command == "squeue" or (command is None and not sacct_works):
        config = _run(["scontrol", "show", "config"])
        age = next((line.split("=")[1].strip().split()[0] for line in (config.stdout if config else "").splitlines()
                    if line.strip().startswith("MinJobAge")), "")
        note = f"MinJobAge is {age or '?'}"
        if age.isdigit() and int(age) < 300:
            return Finding("warn", f"job status by squeue; {note} s", "finished jobs vanish from squeue fast: "
                                                                       "ask for MinJobAge >= 300, or use sacct")
        return Finding("ok", f"job status by squeue ({note}; keep it >= 300 s)")
    if not sacct_works:
        return Finding("FAIL", "slurm-status-command is sacct but sacct does not work here",
                       "set slurm-status-command: squeue in the profile")
    return Finding("ok", "job status by sacct")


# --- the workflow's folders and the machine ---------------------------------------------------

def storage_findings(config: dict) -> list[Finding]:
    found: list[Finding] = []
    from .layout import checkpoint_sources, glob_problem, placement_problem

    root = os.path.abspath(os.path.expanduser(str(config.get("input_root", ""))))
    out = os.path.abspath(os.path.expanduser(str(config.get("output_root", "results"))))
    pattern = str(config.get("glob", "*"))
    matches: list[str] = []
    if not os.path.isdir(root) or not os.access(root, os.R_OK | os.X_OK):
        found.append(Finding("FAIL", f"input_root {root} is not a readable folder",
                             "set input_root in config/config.yaml or with --config input_root=PATH"))
    elif not glob_problem(pattern):  # a glob that climbs out of the tree is named below, not run
        matches = list(checkpoint_sources(root, pattern).values())
        found.append(Finding("ok" if matches else "warn", f"input_root {root}: {len(matches)} file(s) match "
                             f"{config.get('glob')!r}", "" if matches else "check glob in the config"))

    for problem in (placement_problem(root, out), glob_problem(pattern)):
        if problem:
            what, _, fix = problem.rpartition(" (")  # the fix is the closing parenthesis
            found.append(Finding("FAIL", what, fix.rstrip(")")))
    probe_dir = out
    while not os.path.exists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".ckpt-migrate-doctor-"):
            pass
        found.append(Finding("ok", f"output_root {out} is writable"))
    except OSError as exc:
        found.append(Finding("FAIL", f"output_root {out} is not writable ({exc.strerror})",
                             "pick a folder you can write"))
    local = next((p for p in NODE_LOCAL if out == p or out.startswith(p + "/")), None)
    if local:
        found.append(Finding("FAIL", f"output_root {out} is on a node-local filesystem ({local})",
                             "use a shared filesystem the GPU nodes also see (scratch or project space)"))
    if "/scratch/" in out + "/":
        found.append(Finding("warn", f"output_root {out} is on scratch, where files unused for 60 days are "
                             f"deleted (OSC's users' guides; confirm for your project): the converted files "
                             f"would go with them", "use project space, e.g. /fs/ess/PAS2836/<you>/ckpt-migrate"))
    need, how = _bytes_needed(out, matches)
    free = shutil.disk_usage(probe_dir).free
    found.append(Finding("ok" if free >= need else "FAIL",
                         f"{free / 2**30:.1f} GiB free for output_root; "
                         f"converted files need {how} {need / 2**30:.1f} GiB",
                         "" if free >= need else "free space or move output_root"))
    return found


def validation_findings(config: dict) -> list[Finding]:
    """With ``validation: data`` set: which language pairs of the tree have a held-out shard, and
    whether each shard is modded-nanogpt's token format (its header only: no torch here)."""
    from .layout import checkpoint_sources, glob_problem, lang_and_run
    from .validation import ShardError, shard_for, shard_length

    settings = config.get("validation") or {}
    data, root = settings.get("data"), os.path.abspath(os.path.expanduser(str(config.get("input_root", ""))))
    pattern = str(config.get("glob", "*"))
    if not data or not os.path.isdir(root) or glob_problem(pattern):
        return []
    langs = sorted({lang_and_run(os.path.relpath(p, root))[0] for p in checkpoint_sources(root, pattern).values()})
    found, missing = [], []
    for lang in langs:
        shard = shard_for(data, lang)
        if shard is None:
            missing.append(lang or "(no language pair)")
            continue
        try:
            count = shard_length(shard)
        except ShardError as exc:
            found.append(Finding("FAIL", f"validation shard for {lang}: {exc}",
                                 "point validation: data at .bin shards"))
            continue
        wanted = int(settings.get("tokens") or 0) + 1
        found.append(Finding("ok" if count >= wanted else "warn",
                             f"validation shard for {lang}: {shard}, {count:,} tokens",
                             "" if count >= wanted else f"it holds fewer than the {wanted:,} a full validation reads"))
    if missing:
        found.append(Finding("warn", f"no validation shard matches {data!r} for {', '.join(missing)}: those files "
                             f"get no val_loss", "check validation: data ({lang} is the language pair)"))
    return found


def _bytes_needed(out: str, matches: list[str]) -> tuple[int, str]:
    """Model-weight bytes of the small files still to convert: from manifests, else file sizes (an upper bound)."""
    from .layout import OutputLayout
    from .records import read_yaml

    manifests: dict[str, dict] = {}
    for folder, _, files in os.walk(OutputLayout(out).manifests_dir):
        for name in files:
            if name.endswith(".yaml") and not name.startswith("."):
                try:
                    record = read_yaml(os.path.join(folder, name))
                except (OSError, yaml.YAMLError):
                    continue  # a damaged manifest: the plan detects that file again
                manifests[record.get("path", "")] = record
    need, estimated = 0, False
    for path in matches:
        manifest = manifests.get(os.path.abspath(path))
        if manifest is not None:
            need += int(manifest.get("weight_bytes") or 0) if manifest.get("status") == "to_convert" else 0
            continue
        try:
            need += os.path.getsize(path)
            estimated = True
        except OSError:
            pass
    return need, ("at most" if estimated else "about")


def torch_finding() -> Finding:
    """Whether this Python has torch, and which build, read from its installed files without
    importing it: an import costs seconds and ~220 MB on a login node (``--probe`` imports it
    where the conversion jobs run)."""
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec("torch")  # locates the package; runs none of its code
    except (ImportError, ValueError) as exc:
        return Finding("FAIL", f"torch cannot be found here ({exc})", "bash scripts/setup.sh")
    if spec is None or not spec.submodule_search_locations:
        return Finding("FAIL", f"torch is not installed for {sys.executable}", "bash scripts/setup.sh")
    text = ""
    for folder in spec.submodule_search_locations:
        try:
            with open(os.path.join(folder, "version.py"), encoding="utf-8") as f:
                text = f.read(65536)
            break
        except OSError:
            continue
    version = re.search(r"^__version__\s*(?::[^=\n]*)?=\s*['\"]([^'\"\n]+)['\"]", text, re.MULTILINE)
    cuda = re.search(r"^cuda\s*(?::[^=\n]*)?=\s*['\"]([^'\"\n]+)['\"]", text, re.MULTILINE)
    if version is None:
        return Finding("FAIL", f"torch in {list(spec.submodule_search_locations)[0]} has no readable torch/version.py",
                       "bash scripts/setup.sh")
    return Finding("ok", f"torch {version.group(1)} ({'CUDA build' if cuda else 'CPU-only build'}) in {sys.executable}")


# --- the probe -------------------------------------------------------------------------------

def probe(profile: dict, local: bool, timeout: float = 600) -> Finding:
    """Run PROBE_CODE where conversions will run (one SLURM job, or here) and report what it saw."""
    if local:
        out = _run([sys.executable, "-c", PROBE_CODE], timeout=timeout)
        text = (out.stdout + out.stderr) if out else ""
    else:
        request = conversion_request(profile)
        folder = tempfile.mkdtemp(prefix="ckpt-migrate-probe-", dir=os.getcwd())
        log = os.path.join(folder, "probe.log")
        cmd = ["sbatch", "--wait", "--parsable", f"--output={log}", "--time=10",
               f"--cpus-per-task={request.get('cpus_per_task', 1)}", f"--mem={request.get('mem_mb', 4000)}"]
        if request.get("slurm_partition"):
            cmd.append(f"--partition={request['slurm_partition']}")
        if (profile.get("default-resources") or {}).get("slurm_account"):
            cmd.append(f"--account={profile['default-resources']['slurm_account']}")
        if request.get("gres"):
            cmd.append(f"--gres={request['gres']}")
        elif int(request.get("gpu", 0) or 0) > 0:
            cmd.append(f"--gpus={request['gpu']}")
        script = os.path.join(folder, "probe.py")
        with open(script, "w") as f:
            f.write(PROBE_CODE)
        cmd += ["--wrap", f"{sys.executable} {script}"]
        t0 = time.time()
        submitted = _run(cmd, timeout=timeout)
        text = open(log).read() if os.path.exists(log) else ""
        shutil.rmtree(folder, ignore_errors=True)
        if submitted is None or submitted.returncode != 0:
            why = (submitted.stderr.strip() if submitted else "timed out") or text[-300:]
            return Finding("FAIL", f"probe job failed: {' '.join(why.split())[:300]}", "see the lines above")
        text += f"\n(waited {time.time() - t0:.0f} s for the job)"
    line = next((l for l in text.splitlines() if l.startswith("CKPT_MIGRATE_PROBE ")), None)
    if line is None:
        return Finding("FAIL", f"probe printed nothing usable: {' '.join(text.split())[-300:]}", "")
    info = json.loads(line.split(" ", 1)[1])
    where = "here" if local else f"on {info['host']}"
    what = (f"probe {where}: torch {info['torch']} imported in {info['torch_import_s']} s; "
            + (f"GPU {info['gpu']}, CUDA ready in {info['cuda_init_s']} s" if info["cuda_available"]
               else "no CUDA device visible"))
    return Finding("ok" if info["cuda_available"] else "warn", what,
                   "" if info["cuda_available"] else "conversions would run on the CPU: check the GPU request and "
                                                     "that torch is a CUDA build on the GPU nodes")


def run_doctor(profile_dir: str | None, workflow_profile: str | None, configfile: str, overrides: list[str],
               do_probe: bool = False, local: bool = False) -> list[Finding]:
    profile = load_profile(profile_dir, workflow_profile)
    config = load_config(configfile, overrides)
    found: list[Finding] = []
    if profile.get("executor") == "slurm" and not local:
        found += slurm_findings(profile, config)
    elif profile_dir:
        executor = profile.get("executor", "local")
        found.append(Finding("ok", f"profile {profile_dir} runs jobs with the {executor} executor"))
    found += storage_findings(config)
    found += validation_findings(config)
    found.append(torch_finding())
    if do_probe or local:
        found.append(probe(profile, local))
    return found
