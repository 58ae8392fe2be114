"""structlog, configured once: readable lines on the console, JSON lines to a file if asked.

Libraries (drivers, model, scanner) only call `structlog.get_logger(...)`; the command line
calls `configure_logging` once at start-up. Overnight scans want the JSON file: one event per
line, greppable and loadable into a dataframe the next morning.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import structlog


def configure_logging(level: str = "INFO", json_file: str | Path | None = None) -> None:
    # pymmcore-plus sets the root logger to DEBUG when first imported; import it before we
    # set levels, or a later lazy import would undo them.
    import pymmcore_plus  # noqa: F401

    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    shared: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    console = _StderrHandler()
    console.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
            ],
        )
    )
    handlers: list[logging.Handler] = [console]
    if json_file is not None:
        path = Path(json_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(path, encoding="utf-8")
        to_file.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=shared,
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.dict_tracebacks,
                    structlog.processors.JSONRenderer(),
                ],
            )
        )
        handlers.append(to_file)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(numeric)
    # pymmcore-plus logs every device call at DEBUG; keep it to warnings unless asked.
    mm_logger = logging.getLogger("pymmcore-plus")
    mm_logger.setLevel(max(numeric, logging.WARNING))
    mm_logger.addFilter(_drop_cancel_notice)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time, not at start-up: a rich progress bar
    swaps it for a proxy that prints log lines above the bar instead of through it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _drop_cancel_notice(record: logging.LogRecord) -> bool:
    # A stopped scan cancels the MDA on purpose; pymmcore-plus then warns with the whole
    # plan (thousands of positions). The scan logs its own stop.
    return not record.getMessage().startswith("MDA Canceled")
