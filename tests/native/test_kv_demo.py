"""`dendrite demo` (dendrite.demo.main) runs and reports shared pages."""

from dendrite.demo import main


def test_demo_small(capsys):
    assert main(["--context", "1000", "--forks", "20", "--page-size", "16", "--write", "2"]) == 0
    out = capsys.readouterr().out
    assert "after 20 forks 63 (+0)" in out
    assert "20 copy-on-write page copies" in out  # 1000 % 16 != 0: partial last page
    assert "after releasing everything: 0 pages used" in out
