"""Figures and tables for Snakemake's HTML report, made from report.csv with matplotlib."""

from __future__ import annotations

import math

from .atomic import atomic_open, atomic_write_text
from .metrics import CHECK_FIELDS, LOGIT_METRICS, VALIDATION_FIELDS
from .report import NEEDS_A_PERSON, read_report

STATUS_COLORS = {"converted": "#2b8a3e", "not_needed": "#74c0fc", "failed": "#e03131", "unknown": "#f59f00",
                 "unreadable": "#868e96", "unsafe": "#862e9c"}


def _save(fig, path: str) -> None:
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")


def logit_check_figure(rows: list[dict], path: str) -> None:
    """Max and mean |logit diff| of each checked conversion, grouped by language pair, with the tolerance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checked = sorted((r for r in rows if r.get("max_abs_logit_diff") not in ("", None)),
                     key=lambda r: (r["lang_pair"], r["relative_path"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(checked) + 2), 4.2))
    if not checked:
        ax.text(0.5, 0.5, "no conversions were checked", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        _save(fig, path)
        plt.close(fig)
        return
    x = list(range(len(checked)))

    def value(r, key):
        v = float(r[key])
        return v if math.isfinite(v) and v > 0 else float("nan")

    ax.scatter(x, [value(r, "max_abs_logit_diff") for r in checked], marker="^", color="#c92a2a", label="max |diff|")
    ax.scatter(x, [value(r, "mean_abs_logit_diff") for r in checked], marker="o", color="#1971c2", label="mean |diff|")
    tolerances = [float(r["tolerance"]) for r in checked if r.get("tolerance") not in ("", None)]
    for tol in sorted(set(tolerances)):
        ax.axhline(tol, color="#495057", linestyle="--", linewidth=1, label=f"tolerance {tol:g}")
    for i, r in enumerate(checked):
        if r["status"] == "failed":
            ax.annotate("failed", (i, ax.get_ylim()[1]), ha="center", va="top", color="#e03131", fontsize=8)
    # Language-pair bands.
    start, band = 0, 0
    for i in range(1, len(checked) + 1):
        if i == len(checked) or checked[i]["lang_pair"] != checked[start]["lang_pair"]:
            ax.axvspan(start - 0.5, i - 0.5, color="#e9ecef" if band % 2 == 0 else "white", zorder=0)
            band += 1
            ax.text((start + i - 1) / 2, 1.01, checked[start]["lang_pair"] or "(other)", ha="center",
                    transform=ax.get_xaxis_transform(), fontsize=9)
            start = i
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([r["relative_path"].rsplit("/", 1)[0].split("_owt_")[-1] + "/" +
                        r["relative_path"].rsplit("/", 1)[-1].replace("best_state_", "").replace(".pt", "")
                        for r in checked], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("|logit difference| (soft-capped logits)")
    ax.set_title("Logit check per converted checkpoint", pad=18)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    _save(fig, path)
    plt.close(fig)


def status_figure(rows: list[dict], path: str) -> None:
    """Statuses (left) and formats (right) per language pair, as stacked bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    langs = sorted({r["lang_pair"] or "(other)" for r in rows}) or ["(none)"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "status", "Status per language pair"),
                           (axes[1], "format", "Format per language pair")):
        values = sorted({r[key] for r in rows})
        bottom = [0] * len(langs)
        for v in values:
            counts = [sum(1 for r in rows if (r["lang_pair"] or "(other)") == lang and r[key] == v) for lang in langs]
            ax.bar(langs, counts, bottom=bottom, label=v, color=STATUS_COLORS.get(v))
            bottom = [b + c for b, c in zip(bottom, counts)]
        ax.set_title(title)
        ax.set_ylabel("checkpoints")
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def validation_figure(rows: list[dict], path: str) -> None:
    """Validation loss of each checkpoint against its step, one line per run, one panel per
    language pair: which run is best, at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [r for r in rows if r.get("val_loss") not in ("", None)]
    langs = sorted({r["lang_pair"] or "(other)" for r in evaluated})
    fig, axes = plt.subplots(1, max(1, len(langs)), figsize=(max(6.0, 4.2 * len(langs)), 3.8), squeeze=False)
    if not evaluated:
        axes[0][0].text(0.5, 0.5, "no validation loss (set validation: data in the config)", ha="center",
                        va="center", transform=axes[0][0].transAxes)
        axes[0][0].set_axis_off()
    for ax, lang in zip(axes[0], langs):
        runs: dict[str, list[tuple[float, float]]] = {}
        for r in evaluated:
            if (r["lang_pair"] or "(other)") == lang:
                step = float(r["step"]) if str(r.get("step", "")).strip() not in ("", "None") else float("nan")
                runs.setdefault(r["run"] or r["relative_path"], []).append((step, float(r["val_loss"])))
        for run, points in sorted(runs.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"run {run}")
        ax.set_title(lang)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


# Click a column header to sort by it (numbers numerically); click again to reverse.
_SORT_SCRIPT = """<script>
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.style.cursor = "pointer";
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], rows = Array.from(body.rows);
    var dir = th.dataset.dir === "asc" ? -1 : 1;
    th.dataset.dir = dir === 1 ? "asc" : "desc";
    rows.sort(function (a, b) {
      var x = a.cells[col].innerText, y = b.cells[col].innerText, nx = parseFloat(x), ny = parseFloat(y);
      return dir * (!isNaN(nx) && !isNaN(ny) ? nx - ny : x.localeCompare(y));
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
</script>"""
_STYLE = """<style>
body { font-family: sans-serif; font-size: 13px; }
table.sortable { border-collapse: collapse; }
table.sortable th, table.sortable td { border: 1px solid #dee2e6; padding: 3px 6px; white-space: nowrap; }
table.sortable th { background: #f1f3f5; position: sticky; top: 0; }
td.status-failed, td.status-unsafe { color: #c92a2a; font-weight: bold; }
td.status-unknown, td.status-unreadable { color: #e67700; font-weight: bold; }
</style>"""


def html_table(rows: list[dict], columns: list[str], title: str, path: str) -> None:
    """A self-contained HTML page with a sortable table (the report shows HTML, not CSV)."""
    import html

    def shown(column: str, value) -> str:
        if column in _METRICS and value not in ("", None):
            try:
                return f"{float(value):.4g}"
            except ValueError:
                pass
        return str(value if value is not None else "")

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = "".join(
            f'<td class="{"status-" + html.escape(str(r.get(c, ""))) if c == "status" else ""}">'
            f"{html.escape(shown(c, r.get(c, '')))}</td>" for c in columns)
        body.append(f"<tr>{cells}</tr>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{_STYLE}"
            f"</head><body><h3>{html.escape(title)} ({len(rows)})</h3><table class='sortable'><thead><tr>{head}"
            f"</tr></thead><tbody>{''.join(body)}</tbody></table>{_SORT_SCRIPT}</body></html>")
    atomic_write_text(path, page)


_METRICS = {*LOGIT_METRICS, "tolerance", "val_loss"}  # shown with 4 significant digits
TABLE_COLUMNS = ["status", "relative_path", "lang_pair", "run", "step", "format", "variant", "reason",
                 *VALIDATION_FIELDS, *CHECK_FIELDS, "num_layers", "model_dim", "num_heads",
                 "vocab_size", "padded_vocab", "params", "size_bytes", "converted_path"]


def write_report_figures(report_csv: str, logit: str, status: str, table: str, attention: str,
                         validation: str) -> None:
    """Every figure and table of the HTML report, at the paths ``OutputLayout.figures`` names."""
    rows = read_report(report_csv)
    logit_check_figure(rows, logit)
    validation_figure(rows, validation)
    status_figure(rows, status)
    html_table(rows, TABLE_COLUMNS, "All checkpoints", table)
    html_table([r for r in rows if r["status"] in NEEDS_A_PERSON], ["status", "relative_path", "reason"],
               "Files that need a person", attention)
