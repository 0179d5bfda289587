"""The HTML tree picture is self-contained and shows text, scores, tokens, pruning."""

from __future__ import annotations

from html.parser import HTMLParser

import dendrite.program as dp
from dendrite.tree_view import render_html, write_html

VOID = {"meta", "br", "hr", "img", "input", "link"}


class _Balance(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v and not v.startswith("#"):
                self.external.append(v)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(tag)
        else:
            self.stack.pop()


@dp.program
def small(s):
    s += "Q: <b>&</b>\n"
    kids = s.fork(3, label="step")
    kids.gen("t", max_tokens=2, ignore_eos=True)
    best = dp.prune(kids, keep=1)
    return best[0]


def test_html_is_self_contained_and_well_formed(engine, tmp_path):
    r = small.run(engine, seed=0)
    html = render_html(r.tree, title="T <1>", result="R & D")
    p = _Balance()
    p.feed(html)
    assert not p.errors and p.stack == []
    assert not p.external
    assert "http://" not in html and "https://" not in html and "<link" not in html
    assert "Q: &lt;b&gt;&amp;&lt;/b&gt;" in html and "T &lt;1&gt;" in html and "R &amp; D" in html
    assert html.count('<li class="pruned') == 2
    assert html.count('<li class="selected') == 0  # prune marks no winner
    assert html.count('<li class="onpath') == 0
    assert "score " in html and " tok<" in html
    out = write_html(r.tree, tmp_path / "t.html")
    assert out.read_text(encoding="utf-8") == render_html(r.tree)


def test_selected_path_is_marked(engine):
    @dp.program
    def pick(s):
        s += "Q"
        kids = s.fork(2)
        kids.gen("t", max_tokens=1, ignore_eos=True)
        grand = [g for k in kids for g in k.fork(2)]
        for g in grand:
            g.gen("u", max_tokens=1, ignore_eos=True)
        return dp.select(grand)

    r = pick.run(engine, seed=0)
    html = render_html(r.tree)
    assert html.count('<li class="selected') == 1
    assert html.count('<li class="onpath') == 2  # its parent and the root


def test_render_accepts_plain_dicts(engine):
    r = small.run(engine, seed=0)
    assert render_html(r.tree.to_dict()) == render_html(r.tree)


def test_text_summary(engine):
    r = small.run(engine, seed=0)
    text = r.tree.summary()
    lines = text.splitlines()
    assert lines[0].startswith("tree: 4 nodes, depth 1, 2 pruned, 6 generated tokens")
    assert sum("(pruned)" in line for line in lines) == 2
    assert lines[2].startswith("├─ #1 [step]")
    assert r.tree.summary(max_nodes=2).endswith("... 2 more nodes")
