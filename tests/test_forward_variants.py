"""The forward each file was trained with, read from the training code it carries (issue 20).

Upstream's train_gpt.py of 2025-02-01 .. 2025-02-10 writes small v1's keys and shapes exactly,
with another soft-cap (30·sigmoid(z/7.5)), attention scale (15/head_dim) or skip order
(reversed). Each supported forward is built here as a tiny checkpoint whose ``code`` spells
that version's deciding lines (``synthetic.training_code``), and the converted file's logits
are held to a reference forward written below from those lines, independently of
``ckpt_migrate.models``. A file whose code states a forward-deciding line the tool does not
know is ``unknown``, naming the line; and converting a Feb-2025 file as small v1 (what the
tool did before) misses its forward by far more than the check's tolerance.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ckpt_migrate import load_pretrained_checkpoint, synthetic
from ckpt_migrate.check import CheckSettings
from ckpt_migrate.one_file import build_model, convert_file
from ckpt_migrate.detect import detect
from ckpt_migrate.models import GPTBatched

from .conftest import VOCAB, write

EOT = 5  # a document separator inside the tiny vocabulary, so document masking acts
STEP = 100  # of 1000: long window 2 blocks, short 1
T = 384  # 3 blocks: both windows bite
TOLERANCE = 1e-4  # fp32 logits, converted model vs the variant's own forward
CHECK_TOLERANCE = 1e-3  # the logit check's fp32 tolerance (check_settings.DEFAULT_TOLERANCE)
SETTINGS = CheckSettings(batch=1, length=256, seed=3, device="cpu")

SMALL_FORWARDS = [name for name, spec in synthetic.FORWARDS.items() if spec[0] == "small"]
FEB_2025 = [name for name in SMALL_FORWARDS if name.startswith("small_2025_02")]


# --- the reference: each variant's forward as its training script writes it (fp32) ---------------

def _norm(x):
    return F.rms_norm(x, (x.size(-1),))


def _rotary(x):  # (B, T, H, hd): base 1024, half the frequencies zero, in fp32
    hd = x.size(-1)
    freq = (1 / 1024) ** torch.linspace(0, 1, steps=hd // 4, dtype=torch.float32)
    freq = torch.cat([freq, freq.new_zeros(hd // 4)])
    theta = torch.outer(torch.arange(x.size(1), dtype=torch.float32), freq)
    cos, sin = theta.cos()[None, :, None, :], theta.sin()[None, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), 3)


def _window_mask(ids, window_blocks):  # (B, 1, T, T): causal, same document, key block in the window
    docs = (ids == EOT).cumsum(-1)
    q = torch.arange(ids.size(1))[:, None]
    k = torch.arange(ids.size(1))[None, :]
    same_doc = docs[:, :, None] == docs[:, None, :]
    return ((q >= k) & (q // 128 - k // 128 < window_blocks) & same_doc)[:, None]


def reference_logits(sd: dict, forward: str, ids: torch.Tensor, long_blocks: int) -> torch.Tensor:
    """The forward of ``forward``'s training code on its own state dict (``_orig_mod.`` stripped)."""
    family, softcap_line, scale_assign, scale_arg, reverse = synthetic.FORWARDS[forward]
    sd = {k: v.float() for k, v in sd.items()}
    L = 16 if family == "medium" else 12
    scale = 15 / 128 if "15/" in scale_assign + scale_arg else 0.12
    if family == "medium" or "scalars" in sd:  # packed: skips [0, L), residual pairs, value pairs
        s = sd["scalars"]
        skip_w, lambdas, sa_lambdas = s[:L], s[L:3 * L].view(-1, 2), s[3 * L:5 * L].view(-1, 2)
    else:
        skip_w = sd["skip_weights"]
        lambdas = [sd[f"blocks.{i}.lambdas"] for i in range(L)]
        sa_lambdas = [sd.get(f"blocks.{i}.attn.lambdas") for i in range(L)]
    long_layers = (0, 4, 11, 15) if family == "medium" else (0, 4, 7, 11)
    masks = [_window_mask(ids, long_blocks if i in long_layers else long_blocks // 2) for i in range(L)]
    ve = [sd[f"value_embeds.{j}.weight"][ids] for j in range(3)]
    ve = [ve[0], ve[1], ve[2]] + [None] * (L - 6) + [ve[0], ve[1], ve[2]]
    x = x0 = _norm(sd["embed.weight"][ids])
    B, H = ids.size(0), 1

    def attn(i, x):
        if family == "medium":
            w = sd[f"blocks.{i}.attn.qkvo_w"]
            qkv, out = w[:3].flatten(end_dim=1), w[3]
        else:
            qkv, out = sd[f"blocks.{i}.attn.qkv_w"].flatten(end_dim=1), sd[f"blocks.{i}.attn.c_proj.weight"]
        q, k, v = F.linear(x, qkv).view(B, T, 3 * H, 128).chunk(3, dim=-2)
        q, k = _rotary(_norm(q)), _rotary(_norm(k))
        if family == "medium":
            v = _norm(v)
        v = sa_lambdas[i][0] * v + sa_lambdas[i][1] * ve[i].view_as(v) if ve[i] is not None else sa_lambdas[i][0] * v
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * scale
        y = torch.softmax(scores.masked_fill(~masks[i], float("-inf")), dim=-1) @ v
        return F.linear(y.transpose(1, 2).reshape(B, T, H * 128), out)

    def mlp(i, x):
        if family == "medium":
            fc, proj = sd[f"blocks.{i}.mlp.fc_w"], sd[f"blocks.{i}.mlp.proj_w"]
        else:
            fc, proj = sd[f"blocks.{i}.mlp.c_fc.weight"], sd[f"blocks.{i}.mlp.c_proj.weight"]
        return F.linear(F.relu(F.linear(x, fc)).square(), proj)

    def block(i, x):
        x = lambdas[i][0] * x + lambdas[i][1] * x0
        if i != 7:
            x = x + attn(i, x if family == "medium" else _norm(x))
        return x + mlp(i, _norm(x))

    skip_connections = []
    if family == "medium":
        skip_map = {9: 6, 10: 4, 11: 2}
        for i in range(L):
            if i in skip_map:
                x = x + skip_w[skip_map[i]] * skip_connections[skip_map[i]]
            x = block(i, x)
            skip_connections.append(x)
    else:
        n = L // 2
        for i in range(L):
            if i >= n:
                if reverse and i == n:
                    skip_connections.reverse()
                x = x + skip_w[i - n] * skip_connections.pop()
            x = block(i, x)
            if i < n:
                skip_connections.append(x)
    x = _norm(x)
    if family == "medium":
        z = F.linear(x, sd["lm_head_w"])
        return 15 * z * torch.rsqrt(z.square() + 225)
    z = F.linear(x, sd["lm_head.weight"])
    if "7.5 * x.size(-1)" in softcap_line:
        return 30 * torch.sigmoid(z / (7.5 * x.size(-1) ** 0.5))
    assert softcap_line.endswith("/ 7.5)")
    return 30 * torch.sigmoid(z / 7.5)


# --- the files -----------------------------------------------------------------------------------

def _state_dict(forward: str, seed: int) -> dict:
    family = synthetic.FORWARDS[forward][0]
    if family == "medium":
        return synthetic.medium_state_dict(vocab=VOCAB, seed=seed)
    return synthetic.small_state_dict("v2" if forward == "small_v2" else "v1", vocab=VOCAB, seed=seed)


def _checkpoint(forward: str, seed: int = 0, code: str | None = None) -> tuple[dict, dict]:
    sd = _state_dict(forward, seed)
    obj = synthetic.upstream_checkpoint(sd, synthetic.FORWARDS[forward][0], step=STEP, num_iterations=1000,
                                        optimizers=False, eot_token=EOT, forward=forward)
    if code is not None:
        obj["code"] = code
    return sd, obj


def _tokens(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, T), generator=gen)
    ids[0, 100] = ids[0, 250] = ids[1, 200] = EOT  # three documents in one row, two in the other
    return ids


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """forward -> (source state dict, converted path, conversion result), built once."""
    root = tmp_path_factory.mktemp("forwards")
    out = {}
    for seed, forward in enumerate(SMALL_FORWARDS):
        sd, obj = _checkpoint(forward, seed)
        src = write(root, f"{forward}/best_state_{STEP}.pt", obj)
        dst = str(root / f"{forward}.converted.pt")
        out[forward] = (sd, dst, convert_file(src, dst, SETTINGS))
    return out


# --- every supported forward converts to its own logits -----------------------------------------

@pytest.mark.parametrize("forward", SMALL_FORWARDS)
def test_converted_logits_are_the_variants_forward(converted, forward):
    sd, dst, result = converted[forward]
    assert result["status"] == "converted", result.get("reason")
    model, info, checkpoint = load_pretrained_checkpoint(dst, dtype=torch.float32)
    family, softcap_line, scale_assign, scale_arg, reverse = synthetic.FORWARDS[forward]
    cfg = info["config"]
    assert cfg["skip_order"] == ("reversed" if reverse else "unet")
    assert cfg["softcap"] == ("sigmoid30_fixed" if softcap_line.endswith("/ 7.5)") else "sigmoid30_width")
    assert cfg["forward_source"].startswith("code: soft-cap l.")
    assert checkpoint["config"] == cfg  # recorded in the converted file itself
    ids = _tokens()
    with torch.no_grad():
        got = model(ids)
        want = reference_logits(sd, forward, ids, cfg["long_window_blocks"])
    assert cfg["long_window_blocks"] == 2
    assert (got - want).abs().max().item() <= TOLERANCE


def test_medium_loads_with_its_own_forward(tmp_path):
    sd, obj = _checkpoint("medium", seed=11)
    record = detect(write(tmp_path, f"best_state_{STEP}.pt", obj))
    assert (record["format"], record["softcap"], record["skip_order"]) == ("medium", "rsqrt15", "unet")
    model, info, _ = load_pretrained_checkpoint(record["path"], dtype=torch.float32)
    ids = _tokens(1)
    with torch.no_grad():
        diff = (model(ids) - reference_logits(sd, "medium", ids, info["config"]["long_window_blocks"])).abs().max()
    assert diff.item() <= TOLERANCE


@pytest.mark.parametrize("forward", FEB_2025)
def test_converting_a_feb_2025_file_as_small_v1_misses_its_forward(converted, forward):
    """Negative control: the old behaviour (small v1's forward on these keys) is not within tolerance."""
    sd, dst, _ = converted[forward]
    model, info, checkpoint = load_pretrained_checkpoint(dst, dtype=torch.float32)
    as_v1 = dataclasses.replace(model.cfg, softcap="", attn_scale=0.12, skip_order="unet")
    old = build_model(GPTBatched, as_v1, {k: v.float() for k, v in checkpoint["model"].items()})
    ids = _tokens()
    with torch.no_grad():
        want = reference_logits(sd, forward, ids, info["config"]["long_window_blocks"])
        assert (model(ids) - want).abs().max().item() <= TOLERANCE
        missed = (old(ids) - want).abs().max().item()
    assert missed > 5 * CHECK_TOLERANCE, missed  # seen: 11.2 (02-01, 02-02, 02-09), 0.0095 (02-10)


def test_the_forward_and_where_it_came_from_are_in_the_manifest(tmp_path):
    _, obj = _checkpoint("small_2025_02_01")
    record = detect(write(tmp_path, "feb.pt", obj))
    assert (record["format"], record["variant"], record["status"]) == ("small", "v1", "to_convert")
    assert (record["softcap"], record["attn_scale"], record["skip_order"]) == ("sigmoid30_fixed", 0.12, "reversed")
    assert record["forward_source"].startswith("code: soft-cap l.") and "skips l." in record["forward_source"]
    assert any("30*sigmoid(z/7.5)" in note and "reversed" in note for note in record["notes"])
    _, obj = _checkpoint("small_2025_02_10")
    record = detect(write(tmp_path, "feb10.pt", obj))
    assert record["attn_scale"] == 15 / 128 and record["softcap"] == "sigmoid30_width"


def test_the_schedule_length_is_read_under_either_name():
    from ckpt_migrate.families import num_iterations_from_code

    # train_gpt.py of 2025-02-02 (2680eb4e .. f85f2d03) names it train_steps
    assert num_iterations_from_code("class Hyperparameters:\n    train_steps = 1770 # number of iterations\n") == 1770
    assert num_iterations_from_code("    num_iterations = 1750\ntrain_steps = args.num_iterations\n") == 1750


def test_a_file_without_code_is_assumed_its_family(tmp_path):
    _, obj = _checkpoint("small_v1")
    del obj["code"]
    record = detect(write(tmp_path, "nocode.pt", obj))
    assert record["status"] == "to_convert"
    assert record["forward_source"] == "no code: assumed small (train_gpt_small.py)"
    assert (record["softcap"], record["attn_scale"], record["skip_order"]) == ("sigmoid30_width", 0.12, "unet")
    assert any("forward not read from the file" in note for note in record["notes"])
    obj["code"] = synthetic.TRAINING_CODE.format(family="small", num_iterations=1000, eot_token=EOT)
    record = detect(write(tmp_path, "stand_in.pt", obj))
    assert record["status"] == "to_convert" and record["forward_source"].startswith("code holds no model lines")


# --- one forward-deciding line the tool does not know: unknown, naming it --------------------------

_BASE = "small_2025_02_02"


@pytest.mark.parametrize("old,new,named", [
    ("logits = 30 * torch.sigmoid(logits.float() / 7.5)", "logits = 30 * torch.sigmoid(logits.float() / 9.0)",
     "soft-cap"),
    ("self.attn_scale = 0.12", "self.attn_scale = 0.125", "attention scale"),
    ("skip_connections.pop()", "skip_connections.pop(0)", "skip connection"),
    ("            if i < n:\n                skip_connections.append(x)", "            skip_connections.append(x)",
     "skip connection"),
    ("+ [ve[0], ve[1], ve[2]]\n", "+ [ve[2], ve[1], ve[0]]\n", "value-embedding placement"),
    ("block_masks = [long_bm, short_bm,", "block_masks = [short_bm, short_bm,", "per-layer windows"),
    ("x = F.relu(x).square()", "x = F.gelu(x)", "MLP activation"),
    ("x = x + self.mlp(norm(x))", "x = x + self.mlp(x)", "MLP input"),
    ("docs = (input_seq == 5).cumsum(0)", "docs = (input_seq == 5).cumsum(0) % 2", "document masking"),
    ("1728 * x, n=128)", "1792 * x, n=128)", "window schedule"),
])
def test_an_unknown_forward_line_makes_the_file_unknown(tmp_path, old, new, named):
    code = synthetic.training_code(_BASE, eot_token=EOT)
    assert old in code
    changed = code.replace(old, new, 1)
    line_no = changed[:changed.index(new)].count("\n") + 1
    _, obj = _checkpoint(_BASE, code=changed)
    path = write(tmp_path, "changed.pt", obj)
    record = detect(path)
    assert (record["format"], record["status"]) == ("unknown", "unknown"), record["reason"]
    reason = record["reason"]
    assert reason.startswith("small/v1 keys, but the training code's " + named), reason
    assert f"code line {line_no}:" in reason and new.strip().split("\n")[0][:40] in reason, reason
    result = convert_file(path, str(tmp_path / "out.pt"), SETTINGS)
    assert result["status"] == "failed" and named in result["reason"]
    assert not (tmp_path / "out.pt").exists()


def test_another_medium_skip_map_is_unknown(tmp_path):
    code = synthetic.training_code("medium", eot_token=EOT).replace("11: 2,", "11: 3,", 1)
    _, obj = _checkpoint("medium", code=code)
    record = detect(write(tmp_path, "map.pt", obj))
    assert record["status"] == "unknown" and record["reason"].startswith("medium keys, but the training code's "
                                                                         "skip map {9: 6, 10: 4, 11: 3}")


def test_a_medium_line_in_a_small_file_is_unknown(tmp_path):
    code = synthetic.training_code(_BASE, eot_token=EOT).replace(
        "        if ve is not None:", "        v = norm(v)\n        if ve is not None:", 1)
    _, obj = _checkpoint(_BASE, code=code)
    record = detect(write(tmp_path, "vnorm.pt", obj))
    assert record["status"] == "unknown" and "norms v" in record["reason"] and "v = norm(v)" in record["reason"]


# --- converted files: the forward travels in the config; older files load as before ---------------

def test_a_converted_file_without_forward_fields_loads_as_small_v1(converted, tmp_path):
    sd, dst, _ = converted["small_v1"]
    obj = torch.load(dst, weights_only=True)
    for key in ("softcap", "attn_scale", "skip_order", "forward_source"):
        del obj["config"][key]
    older = str(tmp_path / "older.pt")
    torch.save(obj, older)
    record = detect(older)
    assert record["status"] == "not_needed" and record["softcap"] == "" and record["skip_order"] == "unet"
    model, info, _ = load_pretrained_checkpoint(older, dtype=torch.float32)
    ids = _tokens()
    with torch.no_grad():
        diff = (model(ids) - reference_logits(sd, "small_v1", ids, info["config"]["long_window_blocks"])).abs().max()
    assert diff.item() <= TOLERANCE


def test_a_converted_file_with_a_forward_no_model_takes_is_malformed(converted, tmp_path):
    _, dst, _ = converted["small_2025_02_01"]
    obj = torch.load(dst, weights_only=True)
    obj["config"]["skip_order"] = "sideways"
    torch.save(obj, tmp_path / "bad.pt")
    record = detect(str(tmp_path / "bad.pt"))
    assert record["status"] == "unknown" and "config or model is malformed" in record["reason"]


# --- near layouts: the reason says what differs ----------------------------------------------------

def _nested(sd):
    return {k.replace("value_embeds.", "value_embeds.embed."): v for k, v in sd.items()}


def _five(sd):
    return {**sd, "value_embeds.3.weight": sd["value_embeds.0.weight"],
            "value_embeds.4.weight": sd["value_embeds.1.weight"]}


def _two_embeds(sd):
    out = {k: v for k, v in sd.items() if k != "embed.weight"}
    return {**out, "embed1.weight": sd["embed.weight"], "embed2.weight": sd["embed.weight"]}


@pytest.mark.parametrize("make,base,words", [
    (_nested, "small_v1", ["value embeddings are nested", "value_embeds.embed.N.weight"]),
    (_five, "medium", ["5 value embeddings where the medium layout has 3", "3fe7e76b"]),
    (_two_embeds, "medium", ["two token embeddings (embed1/embed2", "one embed.weight"]),
])
def test_near_layouts_say_what_differs(tmp_path, make, base, words):
    sd = make(_state_dict(base, seed=5))
    record = detect(write(tmp_path, "near.pt", {"model": sd, "step": 1}))
    assert record["status"] == "unknown"
    for word in words:
        assert word in record["reason"], record["reason"]
