"""ops/aiogram_lazy.py against the installed aiogram and pydantic: still lazy, still the same types.

The shim leans on how aiogram builds its types at import (one model_rebuild loop with a shared
namespace); these tests fail when an upgrade changes that, so the trick is re-measured or
dropped instead of silently doing nothing or parsing differently.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Updates touching nested and mutually recursive types: a reply inside a message, entities,
# photos, a document, a callback query on a message in a forum topic, an edit with a quote.
UPDATES = [
    {"update_id": 1, "message": {
        "message_id": 5, "date": 1700000000, "chat": {"id": 7, "type": "private", "first_name": "A"},
        "from": {"id": 7, "is_bot": False, "first_name": "A", "language_code": "ru"},
        "text": "/start hi", "entities": [{"type": "bot_command", "offset": 0, "length": 6}],
        "reply_to_message": {
            "message_id": 4, "date": 1699999999, "chat": {"id": 7, "type": "private"},
            "photo": [{"file_id": "p", "file_unique_id": "u", "width": 90, "height": 90}],
            "caption": "c",
        },
    }},
    {"update_id": 2, "callback_query": {
        "id": "q", "chat_instance": "ci", "data": "so:1",
        "from": {"id": 8, "is_bot": False, "first_name": "B"},
        "message": {"message_id": 6, "date": 1700000001, "chat": {"id": -100, "type": "supergroup",
                    "title": "G", "is_forum": True}, "message_thread_id": 3,
                    "document": {"file_id": "d", "file_unique_id": "du", "file_name": "x.pdf"}},
    }},
    {"update_id": 3, "edited_message": {
        "message_id": 7, "date": 1700000002, "edit_date": 1700000003,
        "chat": {"id": 7, "type": "private"}, "text": "fixed",
        "quote": {"text": "q", "position": 0},
        "link_preview_options": {"is_disabled": True},
    }},
]

PROBE = """
import json, sys
lazy = sys.argv[1] == "lazy"
if lazy:
    from ops.aiogram_lazy import import_aiogram
    assert import_aiogram() is True
from aiogram import types
rare = types.Giveaway.__pydantic_complete__  # a type no update below uses
dumps = [types.Update.model_validate(u).model_dump(exclude_none=True)
         for u in json.loads(sys.argv[2])]
print(json.dumps({"rare_built_at_import": rare, "dumps": dumps}, default=repr))
"""


def probe(mode: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode, json.dumps(UPDATES)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(done.stdout)


def test_lazy_import_parses_updates_exactly_as_aiogram_does() -> None:
    lazy, eager = probe("lazy"), probe("eager")
    assert lazy["dumps"] == eager["dumps"]
    # The probe's updates really went through the nested types.
    assert eager["dumps"][0]["message"]["reply_to_message"]["photo"][0]["file_id"] == "p"


def test_lazy_import_still_defers_the_types_nobody_uses() -> None:
    # aiogram's import builds every type; the shim's whole point is that it does not.
    assert probe("eager")["rare_built_at_import"] is True
    assert probe("lazy")["rare_built_at_import"] is False
