"""One home for each default: pyproxy/settings.py. The command line, the sync loop and the
chart's values (which cannot import Python, so this test pins them) all agree with it."""

from __future__ import annotations

from pathlib import Path

import yaml

from pyproxy.cli import build_parser
from pyproxy.runner import Periods
from pyproxy.settings import DEFAULTS

ROOT = Path(__file__).resolve().parents[2]


def test_the_command_line_takes_its_defaults_from_settings():
    args = build_parser().parse_args(["run", "--kubeconfig", "k", "--hostname-override", "n"])
    assert (args.sync_period, args.full_sync_period, args.healthz_bind_address, args.metrics_bind_address,
            args.watch_idle_timeout) == (DEFAULTS.sync_period, DEFAULTS.full_sync_period,
                                         DEFAULTS.healthz_bind_address, DEFAULTS.metrics_bind_address,
                                         DEFAULTS.watch_idle_timeout)


def test_the_sync_loop_and_the_chart_agree_with_settings():
    assert Periods() == Periods(min_sync=DEFAULTS.min_sync_period, sync=DEFAULTS.sync_period,
                                full_sync=DEFAULTS.full_sync_period)
    values = yaml.safe_load((ROOT / "charts" / "pyproxy" / "values.yaml").read_text())
    assert (values["config"]["minSyncPeriod"], values["config"]["syncPeriod"], values["config"]["fullSyncPeriod"]) \
        == (DEFAULTS.min_sync_period, DEFAULTS.sync_period, DEFAULTS.full_sync_period)
    assert values["healthzPort"] == int(DEFAULTS.healthz_bind_address.rsplit(":", 1)[1])
    assert values["metricsPort"] == int(DEFAULTS.metrics_bind_address.rsplit(":", 1)[1])
