"""Access-log lines on their own: text-mode escaping and the JSON form."""

from __future__ import annotations

import json
import logging

from imagegen_server.api import access_log
from imagegen_server.api.access_log import AccessRecord, JsonFormatter


def test_text_access_lines_quote_what_could_forge_a_line() -> None:
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger = logging.getLogger(access_log.ACCESS_LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        record = AccessRecord("Generate", request_id="x\nstatus=OK fake")
        access_log.write(record, "INVALID_ARGUMENT", "bad")
    finally:
        logger.removeHandler(handler)
    line = seen[0].getMessage()
    assert "\n" not in line and 'request_id="x\\nstatus=OK fake"' in line
    assert seen[0].access["status"] == "INVALID_ARGUMENT"  # type: ignore[attr-defined]


def test_json_lines_carry_the_fields_and_no_prompt_unless_asked() -> None:
    record = AccessRecord("Generate", request_id="r1", tenant="acme", prompt=None)
    record.total_s = 0.5
    values = record.fields()
    log_record = logging.LogRecord("imagegen.access", logging.INFO, "", 0, "access", (), None)
    log_record.access = values
    line = json.loads(JsonFormatter().format(log_record))
    assert (line["event"], line["request_id"], line["tenant"]) == ("access", "r1", "acme")
    assert "prompt" not in line and "started" not in line
