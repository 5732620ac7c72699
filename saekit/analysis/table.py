"""The feature table: id, explanation, its held-out score and example activations, as Markdown and HTML.

Read from an analysis's features.json records (`saekit analyze` with explanations), so the
table and the dashboard always show the same numbers.  The firing token of each example is
marked (`**tok**` in Markdown, `<mark>` in HTML), as the Codebook Features talk's table does.
"""

from __future__ import annotations

import html

EXAMPLES = 3


def _examples(meta: dict, feat: dict, esc, mark) -> list[str]:
    """The feature's first top contexts as text, each token escaped and the firing one marked."""
    vocab = meta["vocab"]
    return ["".join(mark(esc(vocab[str(t)])) if k == c["center"] else esc(vocab[str(t)]) for k, t in enumerate(c["tokens"]))
            for c in feat["contexts"][:EXAMPLES]]


def rows(meta: dict) -> list[dict]:
    """One row per live feature with an explanation, best held-out F1 first."""
    feats = [f for f in meta["features"] if f["count"] > 0 and "explanation" in f]
    return sorted(feats, key=lambda f: (-f["explanation"]["f1"], f["index"]))


def _summary(meta: dict) -> str:
    share = meta.get("explained_f1_ge_0.5")
    live = sum(1 for f in meta["features"] if f["count"] > 0)
    s = f"{meta['hook']} ({meta['kind']}, {meta['d_dict']} features, {live} live)"
    if share is not None:
        s += f"; share of features whose explanation reaches held-out F1 ≥ 0.5: {share:.1%}"
    return s


def feature_table_md(meta: dict) -> str:
    def esc(t: str) -> str:
        return t.replace("|", "\\|").replace("\n", "⏎").replace("*", "\\*")

    lines = [f"# Feature table: {_summary(meta)}", "", meta.get("explain_note", ""), "",
             "| feature | explanation | precision | recall | F1 | frequency | examples |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for f in rows(meta):
        e = f["explanation"]
        ex = "<br>".join(_examples(meta, f, esc, lambda t: f"**{t}**"))
        lines.append(f"| `{f['id']}` | {esc(e['text'])} | {e['precision']:.2f} | {e['recall']:.2f} | {e['f1']:.2f} | "
                     f"{f['frequency']:.3g} | {ex} |")
    return "\n".join(lines) + "\n"


def feature_table_html(meta: dict) -> str:
    body = []
    for f in rows(meta):
        e = f["explanation"]
        ex = "<br>".join(_examples(meta, f, html.escape, lambda t: f"<mark>{t}</mark>"))
        body.append(f"<tr id='{html.escape(f['id'])}'><td><code>{html.escape(f['id'])}</code></td><td>{html.escape(e['text'])}</td>"
                    f"<td>{e['precision']:.2f}</td><td>{e['recall']:.2f}</td><td>{e['f1']:.2f}</td>"
                    f"<td>{f['frequency']:.3g}</td><td class='ex'>{ex}</td></tr>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>saekit feature table</title><style>"
            "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;"
            "vertical-align:top}td.ex{font-family:monospace;white-space:pre}mark{background:#fc6}</style></head><body>"
            f"<h1>Feature table</h1><p>{html.escape(_summary(meta))}</p><p>{html.escape(meta.get('explain_note', ''))}</p>"
            "<table><tr><th>feature</th><th>explanation</th><th>precision</th><th>recall</th><th>F1</th><th>frequency</th>"
            "<th>examples (firing token marked)</th></tr>" + "".join(body) + "</table></body></html>\n")

