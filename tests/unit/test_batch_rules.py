"""A batch's body is read whole by the request rules (functions/http/rules.py), once."""

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError


def test_a_keyed_batch_is_read_whole_by_the_rules_not_item_by_item(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # TaskIn's per-item validator (which tries `read_task` on each item) is for a batch the
    # rules refuse; a batch they take is read at once, keys, payloads and all.
    from functions.http import schemas
    from functions.model import NewTask

    tried: list[object] = []
    monkeypatch.setattr(schemas, "read_task", lambda sent: tried.append(sent))
    items: list[dict[str, object]] = [
        {"type": "baz", "execute_at": 0, "idempotency_key": "k-1", "payload": {"é": [1]}},
        {"type": "baz", "execute_at": "2030-01-01T00:00:00Z"},
        {"type": "baz", "execute_at": 1.5, "idempotency_key": None},
        {"type": "baz", "execute_at": 2, "idempotency_key": "~" * 255, "payload": None},
    ]
    read = schemas.BatchIn.model_validate({"tasks": items}).to_new()
    assert tried == []
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert read == [
        NewTask("baz", epoch, "k-1", {"é": [1]}),
        NewTask("baz", datetime(2030, 1, 1, tzinfo=UTC)),
        NewTask("baz", epoch + timedelta(seconds=1.5)),
        NewTask("baz", epoch + timedelta(seconds=2), "~" * 255),
    ]
    # A key the rules refuse: the schema reads the batch, and says which item and why.
    items[3]["idempotency_key"] = "~" * 256
    with pytest.raises(ValidationError, match=r"tasks\.3\.idempotency_key"):
        schemas.BatchIn.model_validate({"tasks": items})
