"""structlog set up once: readable console lines, JSON lines to a file when asked."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from scanner.logs import configure_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    structlog.reset_defaults()


def test_json_lines_go_to_the_file_and_levels_filter(tmp_path, capsys) -> None:
    path = tmp_path / "logs" / "scan.jsonl"
    configure_logging("INFO", path)
    log = structlog.get_logger("flakescan.test")
    log.debug("hidden", tile=1)
    log.info("tile.done", tile=7, flakes=2)
    log.warning("stage.retry", attempt=2)
    for h in logging.getLogger().handlers:
        h.flush()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in records] == ["tile.done", "stage.retry"]
    assert records[0]["tile"] == 7 and records[0]["level"] == "info"
    assert "timestamp" in records[0]
    assert "tile.done" in capsys.readouterr().err


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("CHATTY")


def test_a_stopped_scan_does_not_dump_the_plan_into_the_log(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    configure_logging("INFO", path)
    mm = logging.getLogger("pymmcore-plus")
    mm.warning("MDA Canceled: stage_positions=(%s)", ", ".join(["AbsolutePosition()"] * 1000))
    mm.warning("Device XY failed to respond")
    lines = [json.loads(line)["event"] for line in path.read_text().splitlines()]
    assert lines == ["Device XY failed to respond"]
    mm.filters.clear()
