"""Rendering the report's sections as one self-contained HTML file and as Markdown."""

from __future__ import annotations

import base64
import html
import re
from typing import Any

import pandas as pd

from bonehpc.report.doc import Block, Section, Table, Text, _fmt

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;line-height:1.4;padding:0 1em}
h1{border-bottom:2px solid #345}h2{margin-top:2em;border-bottom:1px solid #ccc;color:#234}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#eef2f6}td:first-child,th:first-child{text-align:left}
caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0}
.note{color:#555;font-size:13px;background:#f7f7f7;padding:6px 10px;border-left:3px solid #bbb}
.missing{color:#8a1c1c;background:#fdf0f0;padding:6px 10px;border-left:3px solid #c33}
.flag{color:#6b4a00;background:#fff6db;padding:6px 10px;border-left:3px solid #d9a400;font-weight:600}
pre{background:#f5f5f5;padding:8px;overflow:auto;font-size:12px;max-height:40em}
figure{margin:1em 0}figcaption{font-size:13px;color:#444}img{max-width:100%;border:1px solid #eee}
nav ul{columns:2;font-size:14px}
"""


def _display_df(df: pd.DataFrame) -> pd.DataFrame:
    return df.map(_fmt)


def _html_block(b: Block) -> str:
    if isinstance(b, Text):
        if b.kind == "pre":
            head, _, body = b.text.partition("\n")
            return f"<p>{html.escape(head)}</p><pre>{html.escape(body)}</pre>"
        cls = f' class="{b.kind}"' if b.kind in ("note", "missing", "flag") else ""
        return f"<p{cls}>{html.escape(b.text)}</p>"
    if isinstance(b, Table):
        if not b.show:
            return ""
        t = _display_df(b.df).to_html(index=False, escape=True, border=0)
        t = t.replace("<table", f'<table id="{b.name}"', 1)
        cap = f"<caption>{html.escape(b.caption)} <small>[{b.name}.csv]</small></caption>"
        return re.sub(r"(<table[^>]*>)", lambda m: m.group(1) + cap, t, count=1)
    data = base64.b64encode(b.png).decode("ascii")
    return (
        f'<figure id="{b.name}"><img alt="{html.escape(b.caption or b.name)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(b.caption)}</figcaption></figure>"
    )


def render_html(title: str, sections: list[Section]) -> str:
    nav = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in sections)
    body = "".join(
        f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>{"".join(_html_block(b) for b in s.blocks)}</section>'
        for s in sections
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><nav><ul>{nav}</ul></nav>{body}</body></html>\n"
    )


def _md_table(df: pd.DataFrame) -> str:
    d = _display_df(df)

    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in d.columns) + " |", "|" + "---|" * len(d.columns)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in d.itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Text):
                if b.kind == "pre":
                    head, _, body = b.text.partition("\n")
                    out += [head, "", "```", body.rstrip(), "```"]
                elif b.kind == "missing":
                    out.append(f"> **MISSING** {b.text}")
                elif b.kind == "flag":  # a result to check before it is reported (the text says why)
                    out.append(f"> ⚠ {b.text}")
                elif b.kind == "note":
                    out.append(f"> {b.text}")
                else:
                    out.append(b.text)
            elif isinstance(b, Table):
                if not b.show:
                    continue
                out += [f"**{b.caption}** ([{b.name}.csv]({b.name}.csv))", "", _md_table(b.df)]
            else:
                out.append(f"![{b.caption or b.name}]({b.name}.png)")
            out.append("")
    return "\n".join(out)
