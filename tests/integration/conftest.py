"""Fixtures: build outputs, one echo upstream per session, Envoy instances on demand.

Every process started here is terminated (SIGTERM, then SIGKILL) and reaped by the
fixture that started it, also when a test fails.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Union

import pytest

import harness
from harness import Envoy, EchoUpstream, Paths


def pytest_collection_finish(session):
    """Missing build outputs stop the run at once, with one message and exit status 1
    (never a skip: a skipped suite would hide a broken build)."""
    if session.config.option.collectonly or not session.items:
        return
    try:
        harness.find_paths()
    except RuntimeError as e:
        pytest.exit(str(e), returncode=1)


@pytest.fixture(scope="session")
def paths() -> Paths:
    try:
        return harness.find_paths()
    except RuntimeError as e:
        problem = str(e)
    # Fail, never skip: a skipped suite would hide a broken build.
    pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session")
def echo(paths: Paths, tmp_path_factory) -> EchoUpstream:
    upstream = EchoUpstream(paths.echo, tmp_path_factory.mktemp("echo"))
    try:
        upstream.start()
    except RuntimeError as e:
        problem = str(e)
    else:
        problem = None
    if problem:
        pytest.fail(problem, pytrace=False)
    yield upstream
    upstream.stop()


_counter = itertools.count()


class EnvoyStarter:
    """Starts Envoy instances and stops all of them at teardown."""

    def __init__(self, paths: Paths, echo: EchoUpstream, tmp_factory):
        self.paths = paths
        self.echo = echo
        self.tmp_factory = tmp_factory
        self.started: list[Envoy] = []

    def _new(
        self, plugin_config: Union[dict, str], concurrency: int, ipv6: bool = False,
        hcm: str = "readme", ratelimit=None,
    ) -> Envoy:
        workdir = Path(self.tmp_factory.mktemp(f"envoy{next(_counter)}"))
        envoy = Envoy(
            self.paths,
            workdir,
            self.echo.port,
            plugin_config,
            concurrency=concurrency,
            ipv6=ipv6,
            hcm=hcm,
            ratelimit=ratelimit,
        )
        self.started.append(envoy)
        return envoy

    def __call__(
        self,
        plugin_config: Union[dict, str],
        *,
        concurrency: int = 2,
        ipv6: bool = False,
        hcm: str = "readme",
        ratelimit=None,
    ) -> Envoy:
        """A running Envoy with `plugin_config` (fails the test if it does not start).
        `ipv6` adds a listener address [::1] on the same port; `hcm` picks the connection
        manager settings ("readme" or Envoy's "defaults")."""
        envoy = self._new(plugin_config, concurrency, ipv6, hcm, ratelimit)
        try:
            return envoy.start()
        except RuntimeError as e:
            problem = f"Envoy did not start: {e}"
        envoy.stop()
        pytest.fail(problem, pytrace=False)

    def expecting_failure(self, plugin_config: Union[dict, str], *, concurrency: int = 2) -> Envoy:
        """An Envoy process that is expected to refuse `plugin_config` and exit."""
        return self._new(plugin_config, concurrency).spawn_expecting_failure()

    def stop_all(self) -> None:
        for envoy in self.started:
            envoy.stop()


@pytest.fixture
def start_envoy(paths, echo, tmp_path_factory) -> Callable[..., Envoy]:
    """Per-test Envoy instances: `start_envoy(plugin_config)`."""
    starter = EnvoyStarter(paths, echo, tmp_path_factory)
    yield starter
    starter.stop_all()


@pytest.fixture(scope="module")
def module_envoy_starter(paths, echo, tmp_path_factory) -> EnvoyStarter:
    """Per-module Envoy instances, for module fixtures that share one configuration."""
    starter = EnvoyStarter(paths, echo, tmp_path_factory)
    yield starter
    starter.stop_all()


@pytest.fixture(params=["http1", "http2"])
def http2(request) -> bool:
    """Runs a test over HTTP/1.1 and over HTTP/2 (h2c with prior knowledge)."""
    return request.param == "http2"
