"""Running the `tuneserve` CLI in-process against a service, and checking its one-line errors."""

from __future__ import annotations

from collections.abc import Callable

from typer.testing import CliRunner, Result

from service.app import Service
from service.cli.main import app

Cli = Callable[..., Result]


def cli_for(service: Service, token: str) -> Cli:
    """cli(*args) runs `tuneserve --address ... --token ... *args` in-process; returns click's Result."""
    runner = CliRunner()

    def invoke(*args: str, token: str = token, address: str | None = None) -> Result:
        address = address or f"127.0.0.1:{service.port}"
        return runner.invoke(app, ["--address", address, "--token", token, *args], env={"COLUMNS": "200"})

    return invoke


def assert_error_line(result: Result, code: int, status: str, *fragments: str) -> None:
    """Exactly one line on stderr, `error: STATUS: ...` naming each fragment, and the exit code."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {status}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
