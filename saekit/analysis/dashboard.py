"""The feature dashboard (one offline HTML file) and the feature-density plot.

The dashboard is `dashboard.html` (vanilla JS, no network) with the analysis JSON
embedded in a `<script type="application/json">` block, so a single file can be mailed,
archived or opened from a notebook.  `<` is written as `\\u003c` inside the JSON so no
token text can close the script element early.
"""

from __future__ import annotations

import html
import json
import math
import os
from importlib import resources
from pathlib import Path

from saekit.runs import atomic


def render_dashboard(meta: dict) -> str:
    """The dashboard HTML for an analysis's features.json content."""
    template = resources.files("saekit.analysis").joinpath("dashboard.html").read_text(encoding="utf-8")
    data = json.dumps(meta, ensure_ascii=False, separators=(",", ":"))
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    title = html.escape(f"{hooks_label(meta)} ({meta.get('kind', '')})")
    return template.replace("__TITLE__", title).replace("__DATA__", data)


def hooks_label(meta: dict) -> str:
    """The hook an analysis read, or `reads IN → writes OUT` for a transcoder, crosscoder or CLT."""
    ins, outs = meta.get("in_hooks") or [meta.get("hook", "")], meta.get("out_hooks") or [meta.get("hook", "")]
    return ins[0] if ins == outs and len(ins) == 1 else f"reads {', '.join(ins)} → writes {', '.join(outs)}"


def density_plot(meta: dict, path: str | os.PathLike) -> Path:
    """PNG histogram of log10(feature frequency); dead features (frequency 0) counted in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    freqs = [f["frequency"] for f in meta["features"]]
    live = [math.log10(f) for f in freqs if f > 0]
    dead = len(freqs) - len(live)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    if live:
        ax.hist(live, bins=min(50, max(10, len(live) // 4)), color="#4a78c2")
    ax.axvline(math.log10(meta["dense_threshold"]), color="#c8553d", ls="--", lw=1, label=f"dense > {meta['dense_threshold']}")
    ax.set_xlabel("log10 feature frequency (share of tokens it fires on)")
    ax.set_ylabel("features")
    window = meta.get("dead_window", f"not fired in {meta['n_rows']:,} analysed tokens")
    ax.set_title(f"{meta['hook']} ({meta['kind']}): {len(freqs)} features, {dead} dead ({window})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    with atomic(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return out


def show(analysis_dir: str | os.PathLike, height: int = 640):
    """Display an analysis's dashboard inline in a notebook (an iframe with the page as srcdoc)."""
    import warnings

    from IPython.display import HTML

    page = (Path(analysis_dir) / "dashboard.html").read_text(encoding="utf-8")
    with warnings.catch_warnings():  # IPython suggests IFrame(src=...), which would need the file served
        warnings.simplefilter("ignore")
        return HTML(f'<iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:{int(height)}px;border:1px solid #ccc"></iframe>')
