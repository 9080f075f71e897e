"""Report plots and the self-contained HTML page from hand-made RunData."""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path

import numpy as np
import pytest

from evomerge.report.data import CandidateRow, MemberRow, RunData, lineage
from evomerge.report.html import write_report
from evomerge.report.plots import kinship_heatmap

PNG = b"\x89PNG\r\n\x1a\n"


def _data() -> RunData:
    members = [
        MemberRow("a", 0.30, 0, (), None, {"t1": 0.5, "t2": 0.1}),
        MemberRow("b", 0.20, 0, (), None, {"t1": 0.1, "t2": 0.3}),
        MemberRow("c", 0.10, 0, (), None, {"t1": 0.0, "t2": 0.2}),
        MemberRow("g1.1", 0.40, 1, ("a", "b"), 2),
        MemberRow("g1.2", 0.15, 1, ("a", "c"), 4),
        MemberRow("g2.1", 0.50, 2, ("g1.1", "c"), 6),
    ]
    cands = [CandidateRow(i, s, ok, {"t1": s, "t2": s / 2} if ok else {}, g)
             for i, (s, ok, g) in enumerate([(0.3, True, 1), (0.4, True, 1), (0.1, True, 1), (0.15, True, 1),
                                             (-1e6, False, 2), (0.5, True, 2)], start=1)]
    kin = {("a", "b"): 0.2, ("a", "c"): -0.1, ("b", "c"): 0.05, ("c", "g1.1"): 0.4, ("a", "g1.1"): 0.7,
           ("b", "g1.1"): 0.6, ("g1.1", "g2.1"): 0.8, ("c", "g2.1"): 0.5, ("a", "g2.1"): 0.6,
           ("b", "g2.1"): 0.5, ("a", "g1.2"): 0.7, ("c", "g1.2"): 0.6}
    events = [
        {"kind": "generation_plan", "payload": {"generation": 1, "plans": [], "reason": "generation 1: every pair"}},
        {"kind": "generation_end", "payload": {"generation": 1, "top": ["g1.1", "a", "b"], "best": "g1.1",
                                               "best_score": 0.4, "evaluations": 4}},
        {"kind": "generation_plan", "payload": {"generation": 2, "plans": [],
                                                "reason": "exploration: best g1.1 with c (lowest kinship)",
                                                "revival": {"revival": 1, "reason": "stalled",
                                                            "revived": [{"key": "c"}]}}},
        {"kind": "stop", "payload": {"reason": "converged: the top-3 set did not change"}},
    ]
    return RunData("unit", cands, members, kin, "pcc", events, {"method": "task_arithmetic"})


def test_gains_and_lineage() -> None:
    d = _data()
    gains = {k: (kin, g) for k, kin, g in d.gains()}
    assert gains["g1.1"] == pytest.approx((0.2, 0.40 - 0.25))
    assert gains["g1.2"] == pytest.approx((-0.1, 0.15 - 0.20))
    assert gains["g2.1"] == pytest.approx((0.4, 0.50 - 0.25))
    assert lineage(d.members, "g2.1") == ["g1.1", "c", "a", "b"]
    assert d.best_candidate().id == 6
    assert [m.key for m in d.top_members(3)] == ["g2.1", "g1.1", "a"]
    assert math.isnan(d.kin("b", "g1.2"))


def test_report_writes_pngs_and_inlines_them(tmp_path: Path) -> None:
    files = write_report(_data(), tmp_path / "rep")
    assert set(files.images) == {"fitness", "tasks", "tree", "kinship", "gain"}
    for p in files.images.values():
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
    page = files.html.read_text()
    blobs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(blobs) == 5
    assert {base64.b64decode(b)[:8] for b in blobs} == {PNG}
    assert "src=\"http" not in page and "<script" not in page  # self-contained
    assert "converged: the top-3 set did not change" in page
    assert "revival 1" in page and "stalled; revived c" in page
    assert "g1.1 + c" in page  # parents of the best in the top-models table


def test_report_of_a_plain_search_skips_population_plots(tmp_path: Path) -> None:
    d = RunData("plain", [CandidateRow(1, 0.1, True, {"t": 0.1}), CandidateRow(2, 0.3, True, {"t": 0.3})])
    files = write_report(d, tmp_path)
    assert set(files.images) == {"fitness", "tasks"}
    assert "no population" in files.skipped["tree"]
    page = files.html.read_text()
    assert page.count("data:image/png;base64,") == 2 and "not drawn" in page
    empty = write_report(RunData("empty"), tmp_path / "e")
    assert empty.images == {} and "no evaluations" in empty.html.read_text()


def test_heatmap_handles_distance_and_nan(tmp_path: Path) -> None:
    m = np.array([[0.0, 2.0, np.nan], [2.0, 0.0, 1.0], [np.nan, 1.0, 0.0]])
    p = kinship_heatmap(m, ["x", "y", "z"], "ed", tmp_path / "h.png")
    assert p.read_bytes()[:8] == PNG
