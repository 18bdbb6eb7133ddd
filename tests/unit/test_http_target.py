"""The `http` kind's rules that need no server: which addresses it refuses (functions/egress.py),
the allow-list setting, Retry-After, `kinds.Retry`, and what answers show of its payload."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import Any

import pytest

from functions import egress, http_target
from functions.completer import result_of
from functions.kinds import Retry
from functions.model import TaskState
from functions.settings import Settings, SettingsError
from functions.store import Claimed


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("fd00:ec2::254", "private"),  # the metadata service over IPv6
        ("169.254.169.254", "link-local"),  # ... and over IPv4
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("100.64.0.1", "not globally reachable"),  # carrier-grade NAT
        ("192.0.2.1", "private"),  # documentation
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
    ],
)
def test_addresses_that_are_not_public_are_refused_saying_what_they_are(
    address: str, why: str
) -> None:
    found = egress.why_refused(ipaddress.ip_address(address))
    assert found is not None and why in found


@pytest.mark.parametrize(
    "address",
    [
        "93.184.215.14",
        "8.8.8.8",
        "172.32.0.1",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
    ],
)
def test_public_addresses_are_not(address: str) -> None:
    assert egress.why_refused(ipaddress.ip_address(address)) is None


def test_the_allow_list_matches_names_to_the_host_and_networks_to_the_address() -> None:
    allow = egress.allowed("hooks.internal,10.0.0.0/8,::1/128")
    loopback = ipaddress.ip_address("127.0.0.1")
    assert allow.allows("HOOKS.internal.", loopback)
    assert allow.allows("anything", ipaddress.ip_address("10.9.8.7"))
    assert allow.allows("[::1]", ipaddress.ip_address("::1"))
    assert not allow.allows("other.internal", loopback)
    assert not allow.allows("10.0.0.1", loopback)  # a network is matched to the address
    egress.check("hooks.internal", loopback, allow)
    with pytest.raises(egress.AddressRefused, match=r"other \(127.0.0.1\): a loopback"):
        egress.check("other", loopback, allow)
    with pytest.raises(egress.AddressRefused, match=r"to 127\.0\.0\.1: a loopback address"):
        egress.check("127.0.0.1", loopback, egress.allowed(None))


def test_the_setting_takes_names_addresses_and_cidrs() -> None:
    read = Settings(http_allowed_hosts=" Hooks.Example. , 10.1.2.3/8,,::1, a_b-c.d ")
    assert read.http_allowed_hosts == "hooks.example,10.0.0.0/8,::1/128,a_b-c.d"
    assert Settings(http_allowed_hosts="").http_allowed_hosts == ""
    for bad in ("http://x", "a b", "-a", "10.0.0.0/33", "a..b", "x" * 64, "a/b", "é.example"):
        with pytest.raises(SettingsError, match="TASKRUNNER_HTTP_ALLOWED_HOSTS: must be host"):
            Settings(http_allowed_hosts=bad)


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    now = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert http_target.retry_after_s("2", now) == 2.0
    assert http_target.retry_after_s(" 0 ", now) == 0.0
    assert http_target.retry_after_s("9" * 400, now) == 1e9
    assert http_target.retry_after_s("Tue, 01 Jan 2030 12:00:30 GMT", now) == 30.0
    assert http_target.retry_after_s("Tue, 01 Jan 2030 11:00:00 GMT", now) == 0.0  # past
    for unreadable in (None, "", "-1", "1.5", "soon", "²"):
        assert http_target.retry_after_s(unreadable, now) is None


def test_retry_sets_the_next_attempts_time_within_retry_max_s() -> None:
    settings = Settings(retry_base_s=60, retry_max_s=100)
    claimed = Claimed(1, "http", 1, 3)
    assert result_of(claimed, None, Retry(2), settings).retry_in_s == 2.0
    assert result_of(claimed, None, Retry(1e9), settings).retry_in_s == 100.0
    assert result_of(claimed, None, Retry(-5), settings).retry_in_s == 0.0
    assert result_of(claimed, None, Retry(float("nan")), settings).retry_in_s == 60.0  # backoff
    assert result_of(claimed, None, ValueError(), settings).retry_in_s == 60.0
    last = result_of(Claimed(1, "http", 3, 3), None, Retry(2, "busy"), settings)
    assert (last.state, last.error) == (TaskState.FAILED, "Retry: busy")


def test_answers_show_header_names_with_masked_values() -> None:
    payload: dict[str, Any] = {
        "url": "https://a.b/",
        "headers": {"Authorization": "Bearer x", "X-A": ""},
    }
    assert http_target.masked(payload) == {
        "url": "https://a.b/",
        "headers": {"Authorization": "***", "X-A": "***"},
    }
    assert payload["headers"]["Authorization"] == "Bearer x"  # the stored one is left as it was
    assert http_target.masked({"url": "https://a.b/"}) == {"url": "https://a.b/"}
    assert http_target.masked("not an object") == "not an object"


def test_a_port_nothing_listens_on_and_a_header_named_twice_are_refused() -> None:
    """Port 0 (never connected to) and a port with leading zeros (read differently by
    parsers); `X-Key` and `x-key`, one header in HTTP, of which one value would be lost."""
    for url in ("http://a.b:0/", "https://a.b:0443/"):
        with pytest.raises(ValueError, match="is not an http:// or https:// URL"):
            http_target.check_payload({"url": url})
    http_target.check_payload({"url": "http://a.b:1/x"})
    with pytest.raises(ValueError, match="names X-Key and x-key, the same header"):
        http_target.check_payload({"url": "https://a.b/", "headers": {"X-Key": "a", "x-key": "b"}})
    http_target.check_payload({"url": "https://a.b/", "headers": {"X-Key": "a", "X-Other": "b"}})


def test_a_refused_header_value_is_never_quoted() -> None:
    for value in ("secret\n", " secret", "sécret", 5):
        with pytest.raises(ValueError) as refused:
            http_target.check_payload({"url": "https://a.b/", "headers": {"X-Key": value}})
        assert "secret" not in str(refused.value) and "X-Key" in str(refused.value)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://0177.0.0.1/", "host '0177.0.0.1' is not an IPv4 address as written"),
        ("http://127.1:80/", "host '127.1' is not an IPv4 address as written"),
        ("https://2130706433", "host '2130706433' is not an IPv4 address"),
        ("http://256.1.1.1/", "four numbers 0 to 255 without leading zeros (0177 is octal"),
        ("http://0x7f000001:80/", "host '0x7f000001' is not an IPv4 address as written"),
        ("http://0x7f.1/", "(0177 is octal to some readers, 0x7f hex)"),
        ("http://0x7F.0.0.1/", "host '0x7F.0.0.1' is not an IPv4 address as written"),
        ("http://[::1]:8080/", "has an IPv6 address for its host, which it cannot: use a name"),
        ("http://[2001:db8::1]/", "use a name that resolves to it"),
        ("http://[::ffff:127.0.0.1]/", "has an IPv6 address for its host"),
    ],
)
def test_a_url_whose_host_readers_read_differently_is_refused_saying_why(
    url: str, said: str
) -> None:
    with pytest.raises(ValueError) as refused:
        http_target.check_payload({"url": url})
    assert said in str(refused.value)


@pytest.mark.parametrize(
    "host",
    ["1.2.3.4", "0.0.0.0", "255.255.255.255", "10.0.0.1", "1.2.3.4a", "0xdead.example",
     "cafe.ca", "0day.example", "0xg.example", "x.0x10", "1_2.3"],
)  # fmt: skip
def test_an_ipv4_address_written_a_b_c_d_and_a_name_with_a_label_of_letters_are_taken(
    host: str,
) -> None:
    """A name may hold labels a resolver reads as numbers (`0xdead`), as long as one is not."""
    http_target.check_payload({"url": f"http://{host}:8080/x"})


def test_the_mask_sent_back_as_a_header_value_is_refused() -> None:
    """A task's answer sent back as it came (a PATCH of its payload) would store `***` in
    place of the secret: refused, naming the header."""
    shown = http_target.masked({"url": "https://a.b/", "headers": {"Authorization": "Bearer x"}})
    with pytest.raises(ValueError, match=r"value of Authorization is \*\*\*, what answers show"):
        http_target.check_payload(shown)
    http_target.check_payload({"url": "https://a.b/", "headers": {"A": "****"}})


CASES: list[Any] = [
    None, [], "https://a.b/", {}, {"url": 5}, {"url": "https://a.b/", "x": 1},
    {"url": "https://a.b/"}, {"url": "HTTP://A.B:0/"}, {"url": "http://a.b:65535/"},
    {"url": "http://a.b:1/"}, {"url": "http://a.b:080/"}, {"url": "http://a.b:00/"},
    {"url": "http://a.b:65536/"}, {"url": "http://a.b:/"}, {"url": "http://[::1]:8080/x"}, {"url": "http://1.2.3.4:8080/x"},
    {"url": "http://[zz]/"}, {"url": "http://a.b/é"}, {"url": "http://a.b/<"},
    {"url": "http://a.b/~!$&'()*+,;=:@[]?#/"}, {"url": "http://u@a.b/"}, {"url": "http://_a.b_/"},
    {"url": "http://-a/"}, {"url": "https://a.b/" + "x" * 4084},
    {"url": "https://a.b/" + "x" * 4085}, {"url": "http://a.b", "method": "get"},
    {"url": "http://a.b", "method": None}, {"url": "http://a.b", "method": "GET", "body": None},
    {"url": "http://a.b", "method": "HEAD", "body": 0}, {"url": "http://a.b", "body": [1]},
    {"url": "http://a.b", "headers": None}, {"url": "http://a.b", "headers": []},
    {"url": "http://a.b", "headers": {"": "x"}}, {"url": "http://a.b", "headers": {"a:": "x"}},
    {"url": "http://a.b", "headers": {"A": ""}}, {"url": "http://a.b", "headers": {"A": " x"}},
    {"url": "http://a.b", "headers": {"A": "x\ty"}}, {"url": "http://a.b", "headers": {"A": "x\t"}},
    {"url": "http://a.b", "headers": {"A": "é"}}, {"url": "http://a.b", "headers": {"Host": "h"}},
    {"url": "http://a.b", "headers": {"A": "***"}}, {"url": "http://a.b", "headers": {"A": "****"}},
    {"url": "http://a.b", "headers": {"A": "** *"}},
    {"url": "http://0177.0.0.1/"}, {"url": "http://127.1/"}, {"url": "http://2130706433"},
    {"url": "http://1.2.3.4.5/"}, {"url": "http://256.0.0.1/"}, {"url": "http://255.255.255.255"},
    {"url": "http://0.0.0.0:80/"}, {"url": "http://10.0.0.1?q"}, {"url": "http://1.2.3.4#f"},
    {"url": "http://01.2.3.4/"}, {"url": "http://1.2.3.04/"}, {"url": "http://1.2.3.4a/"},
    {"url": "http://123abc.example/"}, {"url": "http://0x7f000001/"}, {"url": "http://1_2.3/"},
    {"url": "http://0x7f.1/"}, {"url": "http://0xdead.example/"}, {"url": "http://0xg/"},
]  # fmt: skip


@pytest.mark.parametrize("payload", CASES)
def test_the_schema_the_api_states_takes_what_the_check_takes(payload: Any) -> None:
    """PAYLOAD_SCHEMA (the OpenAPI document's, read by another regex engine: schemathesis's
    validator, in Rust) and check_payload agree, case by case."""
    import jsonschema_rs

    by_schema = jsonschema_rs.Draft202012Validator(http_target.PAYLOAD_SCHEMA).is_valid(payload)
    try:
        http_target.check_payload(payload)
        by_check = True
    except ValueError:
        by_check = False
    assert by_schema == by_check
