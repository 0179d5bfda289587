"""A self-contained HTML picture of an explored tree (no external JS or CSS).

    from dendrite.tree_view import write_html
    result = program.run(engine, ...)
    write_html(result.tree, "tree.html", title="ToT on GSM8K")

Each node shows its own text (prompt pieces plain, generations highlighted
with their capture name), its score, generated tokens, time, and search
annotations (visits, value, prior). Pruned branches are greyed; a selected
node is outlined and the path to it marked; judge and rollout nodes are
dashed. Nodes fold with the browser's native ``<details>``; two buttons open
or fold everything.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

_CSS = """
:root { --fg:#1d2330; --muted:#6b7280; --line:#c7ccd6; --gen:#e8f0ff; --gen-b:#9db8f2;
        --sel:#1a7f37; --pruned:#9aa0a6; --bg:#fbfbfd; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--fg); background: var(--bg); margin: 24px; }
h1 { font-size: 20px; margin: 0 0 4px; }
.stats { color: var(--muted); margin-bottom: 8px; }
.result { background:#fff; border:1px solid var(--line); border-radius:6px; padding:8px 12px;
          margin: 8px 0 12px; white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace; }
.legend span { display:inline-block; margin-right:14px; font-size:12px; color:var(--muted); }
.legend i { display:inline-block; width:12px; height:12px; border-radius:3px; vertical-align:-2px;
            margin-right:4px; border:1px solid var(--line); }
button { font: inherit; font-size: 12px; margin: 6px 6px 10px 0; padding: 2px 10px; cursor: pointer; }
ul.tree, ul.tree ul { list-style: none; margin: 0; padding-left: 22px; position: relative; }
ul.tree { padding-left: 0; }
ul.tree ul::before { content:""; position:absolute; left:9px; top:0; bottom:12px; border-left:1px solid var(--line); }
ul.tree li { position: relative; margin: 6px 0; }
ul.tree ul > li::before { content:""; position:absolute; left:-13px; top:14px; width:12px; border-top:1px solid var(--line); }
.node { background:#fff; border:1px solid var(--line); border-radius:6px; padding:4px 8px; display:inline-block;
        max-width: min(980px, 92vw); vertical-align: top; }
.node summary { cursor: pointer; list-style: none; }
.node summary::-webkit-details-marker { display:none; }
.node summary::before { content:"▸"; color: var(--muted); margin-right:4px; }
.node[open] > summary::before { content:"▾"; }
.id { font-weight: 600; }
.label { color: #5b4bb7; margin-left: 4px; }
.badge { display:inline-block; font-size:12px; border-radius:10px; padding:0 7px; margin-left:5px;
         background:#f1f3f7; color:#374151; }
.badge.score { background:#fff4d6; }
.badge.sel { background:#dcf5e3; color: var(--sel); font-weight:600; }
.badge.pr { background:#eceff1; color:#6b7280; }
.preview { color: var(--muted); margin-left: 6px; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
.text { white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, Menlo, Consolas, monospace;
        font-size: 12.5px; margin: 6px 0 2px; max-height: 18em; overflow: auto; }
.text .gen { background: var(--gen); border-bottom: 2px solid var(--gen-b); border-radius: 2px; }
.text .prompt { color: #4b5563; }
.caps { font-size: 12px; color: var(--muted); margin-top: 2px; }
li.selected > .node { border: 2px solid var(--sel); }
li.onpath > .node { border-left: 4px solid var(--sel); }
li.pruned > .node { background:#f2f3f5; color: var(--pruned); border-color:#dfe1e5; }
li.pruned > .node .text .gen { background:#e9eaed; border-bottom-color:#cfd2d6; }
li.pruned > .node .label, li.pruned > .node .badge { color: var(--pruned); }
li.aux > .node { border-style: dashed; }
"""

_JS = """
function setAll(open){document.querySelectorAll('details.node').forEach(function(d){d.open=open;});}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _as_dict(tree: Any) -> dict:
    if isinstance(tree, dict):
        return tree
    return tree.to_dict()


def _node_html(n: dict, nodes: dict[int, dict], depth: int, open_depth: int,
               on_path: set[int] = frozenset()) -> str:
    classes = []
    if n.get("selected"):
        classes.append("selected")
    elif n["id"] in on_path:
        classes.append("onpath")
    if n.get("pruned"):
        classes.append("pruned")
    info = n.get("info") or {}
    if n.get("label") in ("judge", "rollout") or info.get("rollout"):
        classes.append("aux")
    segs = n.get("segments") or []
    text_html = []
    own = ""
    for s in segs:
        if s["kind"] == "text":
            text_html.append(f'<span class="prompt">{_esc(s["text"])}</span>')
            own += s["text"]
        elif s["kind"] == "gen":
            tip = f'{s.get("name")}: {s.get("num_tokens")} tokens, logprob {_fmt(s.get("logprob"))}, ' \
                  f'{_fmt(s.get("seconds"))}s, {s.get("finish_reason")}'
            text_html.append(f'<span class="gen" title="{_esc(tip)}">{_esc(s["text"])}</span>')
            own += s["text"]
    gen_tokens = n.get("gen_tokens", 0)
    badges = []
    if n.get("score") is not None:
        badges.append(f'<span class="badge score" title="score">score {_fmt(n["score"])}</span>')
    for k in ("visits", "value", "prior", "answer"):
        if k in info:
            badges.append(f'<span class="badge" title="{k}">{k} {_esc(_fmt(info[k]))}</span>')
    badges.append(f'<span class="badge" title="generated tokens">{gen_tokens} tok</span>')
    if n.get("gen_seconds"):
        badges.append(f'<span class="badge" title="generation time">{n["gen_seconds"]:.2f}s</span>')
    if n.get("selected"):
        badges.append('<span class="badge sel">selected</span>')
    if n.get("pruned"):
        why = " (backtracked)" if info.get("backtracked") else ""
        badges.append(f'<span class="badge pr">pruned{why}</span>')
    preview = " ".join(own.split())
    if len(preview) > 70:
        preview = preview[:69] + "…"
    label = f'<span class="label">{_esc(n["label"])}</span>' if n.get("label") else ""
    caps = n.get("captures") or {}
    caps_html = ""
    if caps:
        items = ", ".join(f"{_esc(k)}={_esc(json.dumps(v) if not isinstance(v, str) else repr(v))}" for k, v in caps.items())
        caps_html = f'<div class="caps">captures: {items}</div>'
    meta = f'<div class="caps">path {_esc(n.get("path"))} · seed {_esc(n.get("seed"))} · t={_fmt(n.get("created", 0.0))}s</div>'
    is_open = " open" if depth < open_depth else ""
    body = (
        f'<details class="node"{is_open}><summary><span class="id">#{n["id"]}</span>{label}'
        f'{"".join(badges)}<span class="preview">{_esc(preview)}</span></summary>'
        f'<div class="text">{"".join(text_html) or "<i>(no text)</i>"}</div>{caps_html}{meta}</details>'
    )
    kids = [nodes[c] for c in n.get("children", []) if c in nodes]
    kids_html = ""
    if kids:
        kids_html = "<ul>" + "".join(
            _node_html(k, nodes, depth + 1, open_depth, on_path) for k in kids) + "</ul>"
    return f'<li class="{" ".join(classes)}">{body}{kids_html}</li>'


def render_html(tree: Any, title: str = "Dendrite search tree", result: Any = None, open_depth: int = 6) -> str:
    """The whole HTML document for a `dendrite.program.Tree` (or its ``to_dict()``)."""
    data = _as_dict(tree)
    nodes = {n["id"]: n for n in data["nodes"]}
    total_tok = sum(n.get("gen_tokens", 0) for n in nodes.values())
    pruned = sum(1 for n in nodes.values() if n.get("pruned"))

    def depth_of(i: int) -> int:
        d = 0
        while nodes[i].get("parent") is not None:
            i = nodes[i]["parent"]
            d += 1
        return d

    max_depth = max((depth_of(i) for i in nodes), default=0)
    gen_secs = sum(n.get("gen_seconds", 0.0) for n in nodes.values())
    stats = (
        f"{len(nodes)} nodes · depth {max_depth} · {pruned} pruned · "
        f"{total_tok} generated tokens · {gen_secs:.2f}s summed generation time"
    )
    result_html = f'<div class="result">{_esc(result)}</div>' if result is not None else ""
    legend = (
        '<div class="legend"><span><i style="background:#e8f0ff;border-color:#9db8f2"></i>generated</span>'
        '<span><i style="border:2px solid #1a7f37"></i>selected path</span>'
        '<span><i style="background:#f2f3f5"></i>pruned</span>'
        '<span><i style="border-style:dashed"></i>judge / rollout</span></div>'
    )
    on_path: set[int] = set()  # ancestors of selected nodes
    for n in nodes.values():
        if n.get("selected"):
            p = n.get("parent")
            while p is not None and p not in on_path:
                on_path.add(p)
                p = nodes[p].get("parent")
    roots = "".join(
        _node_html(nodes[r], nodes, 0, open_depth, on_path) for r in data["roots"] if r in nodes
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_esc(title)}</title><style>{_CSS}</style><script>{_JS}</script></head><body>"
        f"<h1>{_esc(title)}</h1><div class=\"stats\">{stats}</div>{result_html}{legend}"
        '<button onclick="setAll(true)">expand all</button><button onclick="setAll(false)">collapse all</button>'
        f'<ul class="tree">{roots}</ul></body></html>\n'
    )


def write_html(tree: Any, path: str | Path, title: str = "Dendrite search tree", result: Any = None) -> Path:
    """Write `render_html` to ``path`` and return it."""
    p = Path(path)
    p.write_text(render_html(tree, title=title, result=result), encoding="utf-8")
    return p
