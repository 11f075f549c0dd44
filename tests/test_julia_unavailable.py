"""The julia backend fails fast, and nothing imports juliacall behind the user's back."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_import_does_not_import_juliacall():
    code = (
        "import sys\n"
        "import diffeqbridge\n"
        "import diffeqbridge.julia\n"
        "diffeqbridge.julia.julia_status()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('juliacall', 'juliapkg'))\n"
        "print('LOADED', bad)\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout, proc.stdout


def test_julia_status_is_fast_and_explains(monkeypatch):
    from diffeqbridge.julia import julia_status

    start = time.perf_counter()
    ok, reason = julia_status(refresh=True)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"julia_status took {elapsed:.1f} s"
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    if ok:
        pytest.skip(f"Julia is usable on this machine: {reason}")
    assert "backend='native'" in reason
    assert any(word in reason for word in ("juliacall", "Julia")), reason


def test_julia_status_without_juliacall(monkeypatch):
    import importlib.util

    import diffeqbridge.julia as dj

    real = importlib.util.find_spec
    monkeypatch.setattr(
        dj.importlib.util, "find_spec", lambda name, *a, **k: None if name == "juliacall" else real(name, *a, **k)
    )
    ok, reason = dj.julia_status(refresh=True)
    dj.julia_status(refresh=True)  # leave the cache as the machine really is
    assert not ok
    assert "pip install 'diffeqbridge[julia]'" in reason
    assert "backend='native'" in reason


def test_julia_status_no_executable_offline(monkeypatch, tmp_path):
    """juliacall present, no Julia anywhere, offline: the 'cannot be downloaded' reason."""
    import diffeqbridge.julia as dj

    monkeypatch.setattr(dj.importlib.util, "find_spec", lambda name, *a, **k: object())
    monkeypatch.setattr(dj, "find_julia_executables", lambda: [])
    monkeypatch.setenv("PYTHON_JULIAPKG_OFFLINE", "yes")
    try:
        ok, reason = dj.julia_status(refresh=True)
    finally:
        monkeypatch.undo()
        dj.julia_status(refresh=True)
    assert not ok
    assert "no Julia executable found" in reason
    assert "PYTHON_JULIAPKG_EXE" in reason and "backend='native'" in reason


def test_julia_status_rejects_a_fake_julia(monkeypatch, tmp_path):
    """PYTHON_JULIAPKG_EXE pointing at something that is not Julia >= 1.10 is reported."""
    import diffeqbridge.julia as dj

    fake = tmp_path / "julia"
    fake.write_text("#!/bin/sh\necho 'julia version 1.6.7'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(dj.importlib.util, "find_spec", lambda name, *a, **k: object())
    monkeypatch.setenv("PYTHON_JULIAPKG_EXE", str(fake))
    monkeypatch.setenv("PYTHON_JULIAPKG_OFFLINE", "yes")
    try:
        cands = dj.find_julia_executables()
        ok, reason = dj.julia_status(refresh=True)
    finally:
        monkeypatch.undo()
        dj.julia_status(refresh=True)
    assert (str(fake), "PYTHON_JULIAPKG_EXE") in cands
    assert not ok
    assert "1.6.7" in reason


def test_require_julia_raises_runtime_error():
    from diffeqbridge.julia import JuliaUnavailableError, julia_status, require_julia

    assert issubclass(JuliaUnavailableError, RuntimeError)
    ok, _ = julia_status()
    if ok:
        pytest.skip("Julia is usable on this machine")
    with pytest.raises(JuliaUnavailableError, match="backend='native'"):
        require_julia()


def test_solve_backend_julia_fails_fast():
    deb = pytest.importorskip("diffeqbridge")
    if not hasattr(deb, "solve"):
        pytest.skip("deb.solve is not importable yet")
    import torch

    from diffeqbridge.julia import julia_status

    if julia_status()[0]:
        pytest.skip("Julia is usable on this machine")
    y0 = torch.full((4, 1), 0.5, dtype=torch.float64)
    prob = deb.SDEProblem(lambda t, y: 1.01 * y, lambda t, y: 0.87 * y, y0, (0.0, 1.0))
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="backend='native'"):
        deb.solve(prob, backend="julia")
    assert time.perf_counter() - start < 5.0
    assert "juliacall" not in sys.modules


def test_juliapkg_json_is_valid():
    import json
    import re
    from pathlib import Path

    from diffeqbridge.julia import julia_package_dir, juliapkg_json_path

    data = json.loads(juliapkg_json_path().read_text())
    assert data["julia"].startswith("1.1")
    uuid = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
    pkgs = data["packages"]
    for name in (
        "StochasticDiffEq",
        "OrdinaryDiffEq",
        "SciMLSensitivity",
        "SciMLBase",
        "DiffEqNoiseProcess",
        "ChainRulesCore",
        "Zygote",
        "DiffEqBridge",
    ):
        assert uuid.match(pkgs[name]["uuid"]), name
    # the local package's path (relative to juliapkg.json) is the Julia package here
    local = (juliapkg_json_path().parent / pkgs["DiffEqBridge"]["path"]).resolve()
    assert local == julia_package_dir().resolve()
    project = (julia_package_dir() / "Project.toml").read_text()
    assert f'uuid = "{pkgs["DiffEqBridge"]["uuid"]}"' in project
    assert Path(julia_package_dir() / "src" / "DiffEqBridge.jl").is_file()


# ----------------------------------------------------------------------------- dispatch
def _gbm(batch: int = 3):
    import torch

    import diffeqbridge as deb

    y0 = torch.full((batch, 1), 0.5, dtype=torch.float64)
    return deb, deb.SDEProblem(lambda t, y: 1.01 * y, lambda t, y: 0.87 * y, y0, (0.0, 1.0))


def test_auto_falls_back_with_one_notice(monkeypatch, caplog):
    """No Julia: backend='auto' solves natively and says so once (one log line)."""
    import logging

    import diffeqbridge.julia.dispatch as dispatch

    deb, prob = _gbm()
    monkeypatch.setattr(dispatch, "_NOTICE_GIVEN", [])
    monkeypatch.setattr(dispatch, "julia_installed", lambda: (False, "juliacall is not installed"))
    with caplog.at_level(logging.INFO, logger="diffeqbridge"):
        start = time.perf_counter()
        sol_auto = deb.solve(prob, deb.SOSRI(), backend="auto")
        deb.solve(prob, deb.SOSRI(), backend="auto")
        elapsed = time.perf_counter() - start
    notices = [r.getMessage() for r in caplog.records if "backend='auto'" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert "native backend (juliacall is not installed)" in notices[0]
    sol_native = deb.solve(prob, deb.SOSRI(), backend="native")
    assert torch_equal(sol_auto.ys, sol_native.ys)
    assert elapsed < 10.0
    assert "juliacall" not in sys.modules


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_auto_warns_when_juliacall_installed_but_julia_missing(monkeypatch):
    """juliacall present (the user asked for Julia) but no Julia: a JuliaFallbackWarning, once."""
    import diffeqbridge.julia.dispatch as dispatch

    deb, prob = _gbm()
    monkeypatch.setattr(dispatch, "_NOTICE_GIVEN", [])
    monkeypatch.setattr(dispatch, "julia_installed", lambda: (False, "no Julia executable found"))
    real = dispatch.importlib.util.find_spec
    monkeypatch.setattr(
        dispatch.importlib.util, "find_spec", lambda name, *a, **k: object() if name == "juliacall" else real(name, *a, **k)
    )
    with pytest.warns(dispatch.JuliaFallbackWarning, match="no Julia executable found"):
        deb.solve(prob, deb.SOSRI(), backend="auto")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deb.solve(prob, deb.SOSRI(), backend="auto")  # once per process


def test_julia_installed_is_cheap_and_false_here():
    from diffeqbridge.julia import julia_status
    from diffeqbridge.julia.dispatch import julia_installed

    if julia_status()[0]:
        pytest.skip("Julia is usable on this machine")
    julia_installed.cache_clear()
    start = time.perf_counter()
    ok, reason = julia_installed()
    assert time.perf_counter() - start < 1.0
    assert not ok and reason


def test_explicit_julia_refuses_native_only_requests(monkeypatch):
    """Requests with no julia counterpart fail with a ValueError naming the alternative,
    before Julia is loaded (require_julia is bypassed to reach the check)."""
    from diffeqbridge.julia.mapping import UnsupportedOnJulia

    deb, prob = _gbm()
    monkeypatch.setattr("diffeqbridge.julia.require_julia", lambda: None)
    bm = deb.VirtualBrownianTree(0.0, 1.0, (3, 1), seed=0)
    with pytest.raises(UnsupportedOnJulia, match="brownian=VirtualBrownianTree is native-only"):
        deb.solve(prob, deb.SOSRI(), brownian=bm, backend="julia")
    with pytest.raises(ValueError, match="DiscreteAdjoint is native-only"):
        deb.solve(prob, deb.SOSRI(), sensealg=deb.DiscreteAdjoint(), backend="julia")
    with pytest.raises(UnsupportedOnJulia, match="regularize=... is native-only"):
        deb.solve(prob, deb.SOSRI(), regularize="local_error", backend="julia")
    assert "juliacall" not in sys.modules


def test_cli_info_reports_julia():
    proc = subprocess.run(
        [sys.executable, "-m", "diffeqbridge", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.path.join(REPO, "src")},
    )
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("julia "))
    from diffeqbridge.julia import julia_status

    ok, reason = julia_status()
    assert ("available" if ok else "unavailable") in line and reason[:40] in line
    assert "backend='auto'" in proc.stdout


def test_load_failure_is_a_clear_error(monkeypatch):
    """If juliacall fails to start Julia, load() raises JuliaUnavailableError naming the fixes;
    PYTHON_JULIACALL_HANDLE_SIGNALS=yes was set before the attempt."""
    import diffeqbridge.julia.bridge as bridge
    from diffeqbridge.julia import JuliaUnavailableError

    monkeypatch.setattr(bridge, "require_julia", lambda: None)
    monkeypatch.setattr(bridge, "_STATE", {})
    monkeypatch.setitem(sys.modules, "juliacall", None)  # import juliacall -> ImportError
    monkeypatch.delenv("PYTHON_JULIACALL_HANDLE_SIGNALS", raising=False)
    with pytest.raises(JuliaUnavailableError, match="PYTHON_JULIAPKG_EXE, or use backend='native'"):
        bridge.load()
    assert os.environ["PYTHON_JULIACALL_HANDLE_SIGNALS"] == "yes"
    assert not bridge.is_loaded()
