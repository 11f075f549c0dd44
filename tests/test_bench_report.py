"""The benchmark tables in BENCHMARKS.md are what ``tools/bench_report.py`` renders from the
committed ``benchmarks/results/*.json``, and every benchmark's plot renders from its JSON.

Regenerate after re-running a benchmark: ``python tools/bench_report.py --write``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import bench_report as R  # noqa: E402 - tools/ is not a package

DOCS = R.load_results()
META_KEYS = {"command", "quick", "date", "loadavg_start", "loadavg_end", "versions", "git", "torch_threads"}


def test_results_exist_and_follow_the_schema():
    assert len(DOCS) >= 10, sorted(DOCS)
    for name, doc in DOCS.items():
        assert doc["benchmark"] == name
        assert doc["schema"] == 1
        assert META_KEYS <= set(doc["meta"]), (name, META_KEYS - set(doc["meta"]))
        size = (R.RESULTS / f"{name}.json").stat().st_size
        assert size < 200_000, (name, size)


def test_fill_blocks_rewrites_only_inside_markers():
    a = "<!-- bench-table: a:t -->\n{}\n<!-- /bench-table -->\n"
    b = "<!-- bench-table: b:t -->\nx\n<!-- /bench-table -->\n"
    text = "intro\n" + a.format("| old |") + "prose | kept\n" + b
    new, unknown = R.fill_blocks(text, {"a:t": "| new |\n|---|"}, "page")
    assert new == "intro\n" + a.format("| new |\n|---|") + "prose | kept\n" + b
    assert unknown == ["page: b:t"]
    again, _ = R.fill_blocks(new, {"a:t": "| new |\n|---|"})
    assert again == new  # idempotent


def test_benchmarks_md_tables_equal_the_rendered_json():
    tables = R.render_tables(DOCS)
    blocks = 0
    for page in R.pages():
        text = page.read_text()
        blocks += len(R.BLOCK.findall(text))
        new, unknown = R.fill_blocks(text, tables, page.name)
        assert not unknown, unknown
        assert new == text, f"{page.relative_to(REPO)} is stale: run python tools/bench_report.py --write"
    assert blocks >= 10, blocks


@pytest.mark.filterwarnings("ignore")
def test_every_plot_renders(tmp_path):
    written = R.render_plots(DOCS, tmp_path)
    expected = {n for n, d in DOCS.items() if hasattr(R.benchmark_module(n), "plot") and not d.get("skipped")}
    assert {p.stem for p in written} == expected
    for p in written:
        assert p.stat().st_size > 5_000, p
        assert (R.PLOTS / p.name).exists(), f"docs/bench/{p.name} missing: run python tools/bench_report.py --write"
