"""Which forward a checkpoint was trained with, read from the training script it carries (``code``).

A checkpoint's keys say how its weights are stored, not how its model computes: upstream's
``train_gpt.py`` of 2025-02-01 .. 2025-02-10 writes exactly small v1's keys and shapes with
another soft-cap, attention scale or skip order. Every upstream checkpoint carries its
training script as text under ``code``, and the lines that decide the forward are in it.

:func:`forward_from_code` reads those lines as text (never executed): for each fact that
decides the forward (soft-cap, attention scale, skips, value embeddings, residual and value
lambdas, attention and MLP inputs, MLP activation, rotary, QK norm, per-layer windows, window
schedule, document masking) it finds every line that states it and holds it to the spellings
that upstream scripts use; each spelling is tied in a comment to the commits of
KellerJordan/modded-nanogpt that use it (docs/upstream.md has the table). A line that states
a fact in a spelling not listed is a problem naming the line: the file is ``unknown``,
because the tool cannot say what its model computes. Torch-free (the login-node path).
"""

from __future__ import annotations

import re

from .families import ATTN_SCALE, FAMILY_SOFTCAPS, HEAD_DIM, Family
from .code_lines import (MAX_LINE, Line, Reading, find_lines, lines_holding, record_use, show_line, strip_comment,
                         unknown)

# The forward parameters GPTConfig carries (their defaults are the families' own forwards).
SOFTCAPS = {
    # 30·sigmoid(z / (7.5·√D)): small v1 378c4e30 and v2 345b2fb9 (train_gpt.py 2025-02-10 .. 2025-07-14)
    "sigmoid30_width": "30*sigmoid(z/(7.5*sqrt(model_dim)))",
    # 30·sigmoid(z / 7.5): train_gpt.py 2025-02-01 .. 2025-02-09 (27b4138b .. fd6f6af0)
    "sigmoid30_fixed": "30*sigmoid(z/7.5)",
    # 15·z / √(z² + 225): medium 06743860
    "rsqrt15": "15*z/sqrt(z^2+225)",
}



def family_default(family: Family) -> dict:
    """The forward parameters of ``family``'s own script (what a file without code is assumed to be)."""
    return {"softcap": family.softcap, "attn_scale": ATTN_SCALE, "skip_order": "unet"}


# --- the facts --------------------------------------------------------------------------------
# Spellings are matched against a line with every whitespace character removed.

# Soft-cap. Candidates: every line with sigmoid/tanh/rsqrt.
_SOFTCAP_SPELLINGS = (
    # 378c4e30 (small v1), 345b2fb9 (small v2), and every train_gpt.py from 85a0a520 (2025-02-10) to 2025-07-14
    (re.compile(r"logits=30\*torch\.sigmoid\(logits(?:\.float\(\))?/\(7\.5\*x\.size\(-1\)\*\*0\.5\)\)"),
     "sigmoid30_width"),
    # 27b4138b .. aa7d11e2 (2025-02-01 .. 02-08): logits.float() / 7.5;
    # 7cfe441a, 712e418a, fd6f6af0 (02-09): logits / 7.5
    (re.compile(r"logits=30\*torch\.sigmoid\(logits(?:\.float\(\))?/7\.5\)"), "sigmoid30_fixed"),
    # 06743860 (medium), training and validation lines
    (re.compile(r"(?:loss\+?=)?F\.cross_entropy\(15\*logits\*torch\.rsqrt\(logits\.square\(\)\+225\),"
                r"target_seq(?:\.chunk\(4\)\[i\])?\)(?:/4)?"), "rsqrt15"),
)
_SOFTCAP_NEEDLES = ("sigmoid(", "tanh(", "rsqrt(")

# Attention scale: the flex_attention call and, where it names self.attn_scale, that assignment.
_ATTN_CALL = re.compile(r"y=flex_attention\(q\.transpose\(1,2\),k\.transpose\(1,2\),v\.transpose\(1,2\),"
                        r"block_mask=block_mask(?:,scale=(?P<scale>[^,()]+))?\)\.transpose\(1,2\)")
_SCALE_VALUES = {
    "0.12": ATTN_SCALE,  # 378c4e30 .. and 2025-02-17 .. 05-25 (scale=0.12 in the call)
    # 712e418a (02-09), 85a0a520 (02-10): scale=15/self.head_dim; fd6f6af0 (02-09): self.attn_scale = 15/head_dim
    "15/self.head_dim": 15 / HEAD_DIM,
    "15/head_dim": 15 / HEAD_DIM,
}
# self.attn_scale = 0.12: 27b4138b .. 7cfe441a (2025-02-01 .. 02-09), 345b2fb9 (v2), 06743860 (medium)
_ATTN_ASSIGN = re.compile(r"self\.attn_scale=(?P<scale>[^,()]+)")
_ATTN_NEEDLES = ("flex_attention(", "scaled_dot_product_attention(", "attn_scale")

# Skips.
_SKIP_KNOWN = {
    "skip_connections=[]": "init",
    "skip_connections.append(x)": "push",  # small pushes layers < L/2 (under `if i < n:`), medium every layer
    # small, all versions with small keys: layer i >= n takes the last pushed output
    "x=x+self.skip_weights[i-n]*skip_connections.pop()": "pop",  # v1 layout (skip_weights parameter)
    "x=x+skip_weights[i-n]*skip_connections.pop()": "pop",  # v2 layout (packed scalars)
    # 27b4138b, 5b0a4ce2, 9c766966, 370211a0 (2025-02-01 .. 02-02): reversed once at i == n,
    # so layer i takes layer i - n
    "skip_connections.reverse()": "reverse",
    "skip_weights=self.scalars[:(len(self.blocks)//2)]": "small_weights",  # v2: the first L/2 of the scalars
    # medium 06743860: skip_map {9: 6, 10: 4, 11: 2}, every layer pushed
    "x=x+skip_weights[skip_map[i]]*skip_connections[skip_map[i]]": "map",
    "ifiinskip_map:": "map_test",
    "skip_weights=self.scalars[:len(self.blocks)]": "medium_weights",
}
_SKIP_MAP_START = "skip_map={"
_SKIP_NEEDLES = ("skip_connections", "skip_map", "skip_weights[")

# Value embeddings: where they go (layers 0, 1, 2 and the last three; all versions with these keys).
_VE_KNOWN = {
    "ve=[value_embed(input_seq)forvalue_embedinself.value_embeds]": "compute",
    "ve=[ve[0],ve[1],ve[2]]+[None]*(len(self.blocks)-6)+[ve[0],ve[1],ve[2]]": "placement",
}
# Residual and value mixes (v1 keeps the lambdas on the modules, v2 and medium in packed scalars).
_LAMBDA_KNOWN = {
    "x=self.lambdas[0]*x+self.lambdas[1]*x0": "residual",  # v1 (all its versions)
    "x=lambdas[0]*x+lambdas[1]*x0": "residual",  # v2 345b2fb9, medium 06743860
    "v=self.lambdas[0]*v+self.lambdas[1]*ve.view_as(v)": "value",  # v1
    "v=lambdas[0]*v+lambdas[1]*ve.view_as(v)": "value",  # v2, medium
    "v=self.lambdas[0]*v": "value_alone",
    "v=lambdas[0]*v": "value_alone",
    "lambdas=self.scalars[1*len(self.blocks):3*len(self.blocks)].view(-1,2)": "packed",
    "sa_lambdas=self.scalars[3*len(self.blocks):5*len(self.blocks)].view(-1,2)": "packed",
    "x=self.blocks[i](x,ve[i],x0,lambdas[i],sa_lambdas[i],block_masks[i])": "call",  # v2
    "x=self.blocks[i](x,ve[i],x0,block_masks[i],lambdas[i],sa_lambdas[i])": "call",  # medium
}
# Attention and MLP inputs: small attends to norm(x), medium to x (and norms v first).
_ATTN_INPUT = re.compile(r"x=x\+self\.attn\((?P<input>norm\(x\)|x),ve,(?:sa_lambdas,)?block_mask(?:,sa_lambdas)?\)")
_MLP_KNOWN = {"x=x+self.mlp(norm(x))"}
_V_NORM = "v=norm(v)"  # medium 06743860 only
_ACTIVATION_KNOWN = {"x=F.relu(x).square()"}  # relu²: every version with these keys
_ACTIVATION_NEEDLES = ("relu(", "gelu(", "silu(", "tanh(x")
_ROTARY_KNOWN = {  # half-truncated RoPE, base 1024: every version with these keys
    "angular_freq=(1/1024)**torch.linspace(0,1,steps=dim//4,dtype=torch.float32)": "freq",
    "angular_freq=torch.cat([angular_freq,angular_freq.new_zeros(dim//4)])": "truncate",
    'theta=torch.einsum("i,j->ij",t,angular_freq)': "theta",
}
_QK_NORM = "q,k=norm(q),norm(k)"
_EMBED_KNOWN = {"x=x0=norm(self.embed(input_seq)[None])"}
# Windows: which layers take the long window, short = long // 2, and the schedule over training.
_BLOCK_MASKS = re.compile(r"block_masks=\[(?P<list>(?:long_bm|short_bm)(?:,(?:long_bm|short_bm))*)\]")
_BUILD_BM_KNOWN = {
    "returnbuild_bm(sliding_window_num_blocks),build_bm(sliding_window_num_blocks//2)": "short_half",
    "defbuild_bm(window_size_blocks:Tensor)->BlockMask:": "def",
}
_SCHEDULES = {
    # small: every train_gpt.py with small keys (2025-02-01 .. 02-02 also wrote it as
    # step / train_steps, with train_steps = num_iterations)
    "window_size=next_multiple_of_n(1728*x,n=128)": "small",
    "window_size=next_multiple_of_n(1728*step/train_steps,n=128)": "small",
    "window_size=next_multiple_of_n(3456*factor,n=128)": "medium",  # 06743860, with the cubic factor below
}
_MEDIUM_FACTOR = "factor=4*x**3-6*x**2+3*x"
_DOCS = re.compile(r"docs=\(input_seq==\d{1,12}\)\.cumsum\(0\)")  # every version: split at one token id

_NEEDLES = (*_SOFTCAP_NEEDLES, *_ATTN_NEEDLES, *_SKIP_NEEDLES, "ve=[", "ve = [", "lambdas[", "lambdas=",
            "self.attn(", "self.mlp(", "norm(v)", *_ACTIVATION_NEEDLES, "angular_freq", "norm(q)",
            "self.embed(", "block_masks", "build_bm(", "window_size =", "window_size=", "factor =", "factor=",
            "cumsum(")
_MODEL_NEEDLES = (*_SOFTCAP_NEEDLES, *_ATTN_NEEDLES, *_SKIP_NEEDLES)  # any of these: the code holds a model


def _read_softcap(reading: Reading, family: Family) -> str | None:
    # Every sigmoid/tanh/rsqrt line: upstream scripts with these keys use them only for the soft-cap,
    # and one elsewhere (a gate, a helper) would be a forward this tool does not know.
    candidates = lines_holding(reading, *_SOFTCAP_NEEDLES)
    allowed = FAMILY_SOFTCAPS[family.name]
    known = ", ".join(SOFTCAPS[k] for k in allowed)
    values = set()
    for line in candidates:
        value = next((v for pattern, v in _SOFTCAP_SPELLINGS if pattern.fullmatch(line.key)), None)
        if value is None:
            reading.problems.append(unknown("soft-cap", line, known))
            return None
        values.add(value)
    if not candidates:
        reading.problems.append("the training code has no soft-cap line (30*sigmoid(...) or 15*z*rsqrt(...))")
        return None
    if len(values) > 1:
        reading.problems.append(f"the training code has soft-caps that disagree (code lines "
                                f"{', '.join(str(ln.number) for ln in candidates)})")
        return None
    value = values.pop()
    if value not in allowed:
        reading.problems.append(f"the training code's soft-cap ({show_line(candidates[0])}) is "
                                f"{SOFTCAPS[value]}, not a {family.name} model's")
        return None
    record_use(reading, "soft-cap", candidates)
    return value


def _scale_value(reading: Reading, expr: str, line: Line) -> float | None:
    value = _SCALE_VALUES.get(expr)
    if value is None:
        reading.problems.append(unknown("attention scale", line, "0.12, 15/head_dim"))
    return value


def _read_attn_scale(reading: Reading) -> float | None:
    candidates = lines_holding(reading, *_ATTN_NEEDLES)
    calls, assigned = [], set()
    for line in candidates:
        if line.key.startswith(("from", "import")):
            continue
        call = _ATTN_CALL.fullmatch(line.key)
        assign = _ATTN_ASSIGN.fullmatch(line.key)
        if call:
            if call.group("scale") is None:
                reading.problems.append(f"the training code's attention ({show_line(line)}) uses flex_attention's "
                                        f"default scale 1/sqrt(head_dim), which no upstream version with these "
                                        f"keys does")
                return None
            calls.append((line, call.group("scale")))
        elif assign:
            value = _scale_value(reading, assign.group("scale"), line)
            if value is None:
                return None
            assigned.add(value)
            record_use(reading, "attention scale", [line])
        else:
            reading.problems.append(unknown("attention", line, "flex_attention(q, k, v, block_mask, scale=...)"))
            return None
    if not calls:
        reading.problems.append("the training code has no flex_attention call to read the attention scale from")
        return None
    values = set()
    for line, expr in calls:
        if expr == "self.attn_scale":
            if len(assigned) != 1:
                reading.problems.append(f"the training code's attention ({show_line(line)}) uses self.attn_scale, "
                                        f"but {'no' if not assigned else 'more than one'} value is assigned to it")
                return None
            values |= assigned
        else:
            value = _scale_value(reading, expr, line)
            if value is None:
                return None
            values.add(value)
        record_use(reading, "attention scale", [line])
    if len(values) != 1:
        reading.problems.append("the training code's attention scales disagree")
        return None
    return values.pop()


def _skip_map(code: str, line: Line, reading: Reading) -> dict[int, int] | None:
    """The dict literal that starts on ``line`` (it may span a few lines): ``{9: 6, ...}``."""
    lines = code[line.offset: line.offset + 1000].split("\n")[:12]
    text = re.sub(r"\s+", "", "".join(strip_comment(x) for x in lines))
    match = re.match(r"skip_map=\{(?P<body>(?:\d{1,4}:\d{1,4},?)*)\}", text)
    if not match:
        reading.problems.append(unknown("skip map", line, "{9: 6, 10: 4, 11: 2}"))
        return None
    return {int(a): int(b) for a, b in re.findall(r"(\d+):(\d+)", match.group("body"))}


def _previous_key(code: str, line: Line) -> str:
    """The statement before ``line`` (blank and comment lines skipped), whitespace removed."""
    end = line.offset - 1
    for _ in range(8):
        if end <= 0:
            return ""
        start = code.rfind("\n", max(0, end - MAX_LINE), end) + 1
        key = re.sub(r"\s+", "", strip_comment(code[start:end]))
        if key:
            return key
        end = start - 1
    return ""


# The statement each skip line sits under: it decides which layers push and pop, and when the list turns.
_SKIP_GUARDS = {
    "push": {"small": ("if i < n:",)},  # small pushes layers < L/2 only (medium: every layer, unguarded)
    "pop": {"small": ("if i >= n:", "skip_connections.reverse()")},
    "reverse": {"small": ("if i == n:",)},  # once, before the first pop
    "map": {"medium": ("if i in skip_map:",)},
}


def _read_skips(reading: Reading, family: Family, code: str) -> str | None:
    candidates = lines_holding(reading, *_SKIP_NEEDLES)
    kinds: dict[str, list[Line]] = {}
    for line in candidates:
        if line.key.startswith(_SKIP_MAP_START):
            kinds.setdefault("map_def", []).append(line)
            continue
        kind = _SKIP_KNOWN.get(line.key)
        if kind is None:
            reading.problems.append(unknown("skip connection", line, "U-net pop, skip_map"))
            return None
        guards = _SKIP_GUARDS.get(kind, {}).get(family.name)
        if guards and _previous_key(code, line) not in {re.sub(r"\s+", "", g) for g in guards}:
            reading.problems.append(f"the training code's skip connection ({show_line(line)}) is not under "
                                    f"`{guards[0]}` as upstream's is")
            return None
        kinds.setdefault(kind, []).append(line)
    if family.name == "small":
        if "pop" not in kinds or {"map", "map_def", "map_test", "medium_weights"} & set(kinds):
            reading.problems.append("the training code has no U-net skip line (x = x + skip_weights[i - n] * "
                                    "skip_connections.pop()) as a small model has")
            return None
        order = "reversed" if "reverse" in kinds else "unet"
    else:
        if "map" not in kinds or "map_def" not in kinds or {"pop", "reverse", "small_weights"} & set(kinds):
            reading.problems.append("the training code has no skip_map lines as a medium model has")
            return None
        for line in kinds["map_def"]:
            skip_map = _skip_map(code, line, reading)
            if skip_map is None:
                return None
            if skip_map != family.skip_map:
                reading.problems.append(f"the training code's skip map {skip_map} ({show_line(line)}) "
                                        f"is not medium's {family.skip_map}")
                return None
        order = "unet"
    record_use(reading, "skips", [ln for lines in kinds.values() for ln in lines])
    return order


def _read_table(reading: Reading, fact: str, lines: list[Line], known: dict | set, required: tuple = (),
                shown: str = "") -> set | None:
    """Hold ``lines`` to a table of known spellings; the kinds found, or None (a problem recorded)."""
    kinds = set()
    for line in lines:
        kind = known.get(line.key) if isinstance(known, dict) else (line.key if line.key in known else None)
        if kind is None:
            reading.problems.append(unknown(fact, line, shown or "upstream's"))
            return None
        kinds.add(kind)
    missing = [k for k in required if k not in kinds]
    if missing:
        reading.problems.append(f"the training code has no {fact} line"
                                + (f" like `{shown}`" if shown else ""))
        return None
    record_use(reading, fact, lines)
    return kinds


def _read_structure(reading: Reading, family: Family) -> None:
    """The facts every version with these keys shares: any other spelling is a problem."""
    _read_table(reading, "value-embedding placement", lines_holding(reading, "ve=[", "ve = [", starts=("ve=[",)),
                _VE_KNOWN, ("placement",), "ve = [ve[0], ve[1], ve[2]] + [None] * (L - 6) + [ve[0], ve[1], ve[2]]")
    lambdas = lines_holding(reading, "lambdas[", "lambdas=")
    lambdas = [ln for ln in lambdas if not ln.key.startswith(("self.lambdas=nn.Parameter", "def"))]
    _read_table(reading, "residual/value lambdas", lambdas, _LAMBDA_KNOWN, ("residual", "value"),
                "x = lambdas[0] * x + lambdas[1] * x0")
    attn_inputs = lines_holding(reading, "self.attn(")
    if not attn_inputs:
        reading.problems.append("the training code has no attention call line (x = x + self.attn(...))")
        return
    for line in attn_inputs:
        match = _ATTN_INPUT.fullmatch(line.key)
        if not match:
            reading.problems.append(unknown("attention input", line, "x + self.attn(norm(x) or x, ve, ...)"))
            return
        if (match.group("input") == "norm(x)") != family.norm_attn_input:
            reading.problems.append(f"the training code's attention input ({show_line(line)}) is "
                                    f"{'not ' if family.norm_attn_input else ''}normed, unlike a {family.name} model")
            return
    record_use(reading, "attention input", attn_inputs)
    _read_table(reading, "MLP input", lines_holding(reading, "self.mlp("), _MLP_KNOWN, ("x=x+self.mlp(norm(x))",),
                "x = x + self.mlp(norm(x))")
    v_norm = [ln for ln in lines_holding(reading, "norm(v)")]
    if any(ln.key != _V_NORM for ln in v_norm) or bool(v_norm) != family.norm_v:
        line = next((ln for ln in v_norm if ln.key != _V_NORM), v_norm[0] if v_norm else None)
        reading.problems.append(f"the training code {'norms v' if v_norm else 'does not norm v'} "
                                f"({show_line(line) if line else 'no v = norm(v) line'}), unlike a {family.name} model")
        return
    _read_table(reading, "MLP activation", lines_holding(reading, *_ACTIVATION_NEEDLES), _ACTIVATION_KNOWN,
                ("x=F.relu(x).square()",), "x = F.relu(x).square()")
    _read_table(reading, "rotary embedding", lines_holding(reading, "angular_freq"), _ROTARY_KNOWN,
                ("freq", "truncate"), "angular_freq = (1 / 1024) ** linspace(0, 1, dim//4), then dim//4 zeros")
    _read_table(reading, "QK norm", lines_holding(reading, "norm(q)"), {_QK_NORM}, (_QK_NORM,),
                "q, k = norm(q), norm(k)")
    _read_table(reading, "embedding norm", lines_holding(reading, "self.embed(", starts=("x=",)), _EMBED_KNOWN,
                tuple(_EMBED_KNOWN), "x = x0 = norm(self.embed(input_seq)[None])")
    _read_windows(reading, family)
    docs = lines_holding(reading, "cumsum(", starts=("docs=",))
    if not docs or any(not _DOCS.fullmatch(ln.key) for ln in docs):
        line = next((ln for ln in docs if not _DOCS.fullmatch(ln.key)), None)
        reading.problems.append(unknown("document masking", line, "docs = (input_seq == EOT).cumsum(0)") if line
                                else "the training code has no document-masking line (docs = (input_seq == EOT)"
                                     ".cumsum(0))")
    else:
        record_use(reading, "document masking", docs)


def _read_windows(reading: Reading, family: Family) -> None:
    masks = lines_holding(reading, "block_masks", starts=("block_masks=",))
    expected = ",".join("long_bm" if i in family.long_window_layers else "short_bm" for i in range(family.num_layers))
    for line in masks:
        match = _BLOCK_MASKS.fullmatch(line.key)
        if not match or match.group("list") != expected:
            reading.problems.append(unknown("per-layer windows", line, f"long at layers "
                                             f"{', '.join(map(str, family.long_window_layers))}"))
            return
    if not masks:
        reading.problems.append("the training code has no per-layer window list (block_masks = [...])")
        return
    record_use(reading, "per-layer windows", masks)
    if _read_table(reading, "short window", lines_holding(reading, "build_bm("), _BUILD_BM_KNOWN, ("short_half",),
                   "build_bm(n), build_bm(n // 2)") is None:
        return
    schedule = lines_holding(reading, "window_size =", "window_size=", starts=("window_size=",))
    kinds = _read_table(reading, "window schedule", schedule, _SCHEDULES, (family.name,),
                        "window_size = next_multiple_of_n(1728 * x, n=128)" if family.name == "small"
                        else "window_size = next_multiple_of_n(3456 * factor, n=128)")
    if kinds is None:
        return
    if kinds != {family.name}:
        reading.problems.append(f"the training code's window schedule is not a {family.name} model's")
        return
    if family.name == "medium":
        factor_lines = lines_holding(reading, "factor =", "factor=", starts=("factor=",))
        _read_table(reading, "window schedule factor", factor_lines,
                    {_MEDIUM_FACTOR}, (_MEDIUM_FACTOR,), "factor = 4 * x ** 3 - 6 * x ** 2 + 3 * x")


def forward_from_code(code: object, family: Family) -> tuple[dict, str, str]:
    """``(forward, forward_source, problem)`` of a ``family`` checkpoint whose training script is ``code``.

    ``forward`` holds GPTConfig's forward parameters (``softcap``, ``attn_scale``, ``skip_order``).
    ``problem`` is "" when every forward-deciding line of the code is one this tool reproduces;
    otherwise it names the first line that is not (the file is then ``unknown``). Without code,
    or with code that holds no model, the family's own forward is assumed and the source says so.
    """
    default = family_default(family)
    if not isinstance(code, str):
        return default, f"no code: assumed {family.name} ({family.script})", ""
    found, problem = find_lines(code, _NEEDLES)
    if problem:
        return default, "code", problem
    reading = Reading(lines=found)
    if not any(reading.lines.get(n) for n in _MODEL_NEEDLES):
        return default, f"code holds no model lines: assumed {family.name} ({family.script})", ""
    softcap = _read_softcap(reading, family)
    attn_scale = _read_attn_scale(reading) if not reading.problems else None
    skip_order = _read_skips(reading, family, code) if not reading.problems else None
    if not reading.problems:
        _read_structure(reading, family)
    if reading.problems:
        return default, "code", reading.problems[0]
    forward = {"softcap": softcap, "attn_scale": attn_scale, "skip_order": skip_order}
    shown = ("soft-cap", "attention scale", "skips")
    parts = [f"{fact} l.{'+'.join(map(str, sorted(set(reading.used[fact]))[:4]))}" for fact in shown]
    others = len(reading.used) - len(shown)
    return forward, f"code: {'; '.join(parts)} (+{others} other forward facts checked)", ""


def describe_forward(forward: dict) -> str:
    """One line for reports: ``30*sigmoid(z/7.5), attention scale 0.1172, skips reversed``."""
    return (f"{SOFTCAPS.get(forward.get('softcap', ''), forward.get('softcap'))}, attention scale "
            f"{forward.get('attn_scale', ATTN_SCALE):.4g}, skips {forward.get('skip_order', 'unet')}")
