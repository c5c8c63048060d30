"""The e2e specs runner's own logic (lab/e2especs.py): which specs a report holds, the table,
and what counts as a regression against upstream."""

from __future__ import annotations

import re

from lab import e2especs as e


def _report(*specs: tuple[str, str, str]) -> list[dict[str, object]]:
    reports: list[dict[str, object]] = [{"LeafNodeType": "SynchronizedBeforeSuite", "State": "passed"}]
    for name, state, message in specs:
        head, _, leaf = name.rpartition(" should ")
        reports.append({"LeafNodeType": "It", "ContainerHierarchyTexts": [head], "LeafNodeText": f"should {leaf}",
                        "State": state, "RunTime": 2_500_000_000,
                        **({"Failure": {"Message": message + "\nmore"}} if message else {})})
    return [{"SuiteDescription": "Kubernetes e2e suite", "SpecReports": reports}]


def test_only_the_focused_specs_are_kept_and_the_labs_exclusions_are_marked():
    report = _report(
        ("[sig-network] Services should serve a basic endpoint from pods [Conformance]", "passed", ""),
        ("[sig-network] Services should work after restarting kube-proxy [Disruptive]", "skipped", ""),
        ("[sig-storage] Secrets should be immutable", "skipped", ""),
        ("[sig-network] Services should be rejected when no endpoints exist", "failed", "no reject seen"),
    )
    specs = e.parse_report(report, focus=e.FOCUS)
    assert set(specs) == {
        "[sig-network] Services should serve a basic endpoint from pods [Conformance]",
        "[sig-network] Services should work after restarting kube-proxy [Disruptive]",
        "[sig-network] Services should be rejected when no endpoints exist"}
    assert specs["[sig-network] Services should work after restarting kube-proxy [Disruptive]"].state == "excluded"
    rejected = specs["[sig-network] Services should be rejected when no endpoints exist"]
    assert rejected.failure == "no reject seen" and rejected.seconds == 2.5


def test_every_quick_spec_is_in_focus_and_none_is_excluded():
    focus = re.compile("|".join(e.FOCUS))
    skips = re.compile(e.skip_regex())
    for quick in e.QUICK:
        name = f"[sig-network] {quick.replace(chr(92), '')}"
        assert focus.search(name) and not skips.search(name), quick


def test_a_regression_is_an_upstream_pass_that_pyproxy_fails_in_the_same_mode():
    def run(proxy: str, mode: str, **states: str) -> e.Run:
        return e.Run(proxy=proxy, mode=mode, specs={n: e.Spec(n, s, failure=f"{n} broke") for n, s in states.items()})

    runs = [run("pyproxy", "nftables", a="passed", b="failed", c="failed", d="excluded"),
            run("kube-proxy", "nftables", a="passed", b="passed", c="failed", d="excluded"),
            run("pyproxy", "iptables", a="failed"),
            run("kube-proxy", "iptables", a="skipped")]
    assert e.regressions(runs) == ["nftables: b: b broke"]
    text = e.table(runs)
    assert text.splitlines()[0] == "| spec | pyproxy nftables | kube-proxy nftables | pyproxy iptables | kube-proxy iptables |"
    assert "| b | FAIL | pass | - | - |" in text
    assert "| d | excluded | excluded | - | - |" in text


def test_the_repo_list_points_every_registry_at_the_lab(tmp_path):
    text = e.repo_list(tmp_path / "r.yaml").read_text()
    for key in ("promoterE2eRegistry", "gcRegistry", "dockerLibraryRegistry", "buildImageRegistry"):
        assert re.search(rf"^{key}: .*lab\.local", text, re.M), key
    assert "registry.k8s.io" not in text


def test_earlier_runs_make_one_table_and_a_later_run_updates_the_specs_it_holds(tmp_path, capsys):
    def run(proxy: str, mode: str, **states: str) -> e.Run:
        return e.Run(proxy=proxy, mode=mode, seconds=60.0,
                     specs={n: e.Spec(n, s, failure=f"{n} broke") for n, s in states.items()})

    full, rerun = tmp_path / "full", tmp_path / "rerun"
    full.mkdir()
    rerun.mkdir()
    e.save_runs(full / "runs.json", [run("kube-proxy", "iptables", a="passed", b="passed"),
                                     run("pyproxy", "nftables", a="failed", b="passed")])
    # a focused rerun of the failure, and the nftables upstream column
    e.save_runs(rerun / "runs.json", [run("pyproxy", "nftables", a="passed"), run("kube-proxy", "nftables", a="passed")])
    runs = e.load_runs([full, rerun / "runs.json"])
    assert [r.column for r in runs] == ["pyproxy nftables", "kube-proxy nftables", "kube-proxy iptables"]
    assert {n: s.state for n, s in runs[0].specs.items()} == {"a": "passed", "b": "passed"}
    assert runs[0].seconds == 120.0  # both runs' minutes
    assert e.main(["--table", str(full), "--table", str(rerun)]) == 0
    out = capsys.readouterr().out
    assert "| a | pass | pass | pass |" in out and "| b | pass | - | pass |" in out
    # given the other way round, the older failure is the latest word: a regression
    assert e.main(["--table", str(rerun), "--table", str(full)]) == 1
    assert "nftables: a: a broke" in capsys.readouterr().out


def test_a_table_of_a_directory_without_runs_says_what_to_give(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        e.main(["--table", str(tmp_path)])
    assert exit_.value.code == 2
    assert "give a directory an earlier --out wrote" in capsys.readouterr().err
