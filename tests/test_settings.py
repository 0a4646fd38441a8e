"""ServerSettings: each bad setting refused with its name, take() splits a wrapper's keywords."""

from __future__ import annotations

import pytest

from restore.errors import InputError
from restore.settings import DEFAULT_FAULT_AROUND, ServerSettings


@pytest.mark.parametrize("kw,message", [
    ({"fault_around": 0}, "fault_around must be at least 1 page, got 0"),
    ({"record_fault_around": 0}, "record_fault_around must be at least 1 page, got 0"),
    ({"fetchers": 0}, "fetchers must be at least 1, got 0"),
    ({"prefetch_inflight": 0}, "prefetch_inflight must be at least 1 chunk, got 0"),
    ({"poll_us": -1}, "poll_us must be 0 to 1000000 us, got -1"),
    ({"memfd_install": "mmap"}, "memfd_install must be one of copy, continue, got 'mmap'"),
    ({"audit_every": 0}, "audit_every must be at least 1 session, got 0"),
    ({"rebuild_plan_after": 0}, "rebuild_plan_after must be at least 1 session, got 0"),
    ({"plan_sessions": 0}, "plan_sessions must be at least 1 session, got 0"),
    ({"drain_timeout": float("nan")}, "drain_timeout must be 0 or more seconds, got nan"),
])
def test_a_bad_setting_is_refused_by_name(kw, message):
    with pytest.raises(InputError) as refused:
        ServerSettings(**kw)
    assert str(refused.value) == message


def test_take_splits_settings_from_the_other_keywords():
    l1 = object()
    settings, rest = ServerSettings.take({"fault_around": 1, "l1": l1, "use_plan": False})
    assert settings == ServerSettings(fault_around=1, use_plan=False)
    assert rest == {"l1": l1}
    assert ServerSettings.take({}) == (ServerSettings(), {})
    assert ServerSettings().fault_around == DEFAULT_FAULT_AROUND
