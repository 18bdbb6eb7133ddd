"""How a schedule's cron and timezone are read (functions/schedules.py): what cronsim takes,
in words when it does not, and zone names that mean the same on every host."""

from datetime import UTC, datetime, timedelta

import pytest

from functions.schedules import next_occurrence, occurrences_after, parse_cron, parse_timezone

DEC_6 = datetime(2026, 12, 6, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("UTC", "UTC"),
        ("utc", "UTC"),
        ("Europe/Paris", "Europe/Paris"),
        ("europe/PARIS", "Europe/Paris"),
        ("etc/gmt+5", "Etc/GMT+5"),
        ("America/Argentina/Buenos_Aires", "America/Argentina/Buenos_Aires"),
    ],
)
def test_a_zone_is_matched_in_any_case_and_kept_as_iana_spells_it(given: str, stored: str) -> None:
    assert parse_timezone(given) == stored


@pytest.mark.parametrize(
    ("given", "said"),
    [
        # The host's own zone: a laptop's is not Lambda's.
        ("localtime", "is whatever the machine reading it is set to"),
        ("LocalTime", "is whatever the machine reading it is set to"),
        ("posixrules", "is whatever the machine reading it is set to"),
        # Files of the zone directory that are no place's zone.
        ("Factory", "unknown timezone 'Factory'"),
        ("right/UTC", "unknown timezone 'right/UTC'"),
        ("posix/Europe/Paris", "unknown timezone 'posix/Europe/Paris'"),
        ("US/Pacific-New", "unknown timezone"),  # (removed from the tz database in 2020)
        ("Europe/Paris ", "unknown timezone"),
        ("../etc/passwd", "unknown timezone"),
        ("", "unknown timezone"),
    ],
)
def test_a_zone_that_depends_on_the_host_or_is_no_place_is_refused(given: str, said: str) -> None:
    with pytest.raises(ValueError, match="give an IANA name") as refused:
        parse_timezone(given)
    assert said in str(refused.value)


@pytest.mark.parametrize(
    ("cron", "said"),
    [
        ("0 0 30 2 *", "never runs: no month in its month field '2' has a day '30'"),
        ("0 0 31 2 *", "never runs: no month in its month field '2' has a day '31'"),
        ("0 0 31 2,4,6 *", "never runs: no month in its month field '2,4,6' has a day '31'"),
        ("0 0 30-31 feb *", "never runs: no month in its month field 'feb' has a day '30-31'"),
        ("0 0 32 2 *", "day of month field '32' is not one it takes (1-31; L for"),
        ("0 0 W * *", "day of month field 'W' is not one it takes"),
        ("0 0 * * 5#6", "day of week field '5#6' is not one it takes (0-7 or SUN-SAT"),
        ("* * * jan-dec mon-sun", "field 'mon-sun' has a range that runs backwards, as SUN is 0"),
        ("* * * * 1-0", "field '1-0' has a range that runs backwards, as SUN is 0: end it with 7"),
        ("* * * * 5-1", "day of week field '5-1' is not one it takes"),
    ],
)
def test_a_cron_refused_says_why(cron: str, said: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_cron(cron)
    assert said in str(refused.value)


@pytest.mark.parametrize(
    ("cron", "first", "then"),
    [
        # A day and month that occur only in a leap year are taken (not "never").
        ("0 0 29 2 *", "2028-02-29", "2032-02-29"),
        ("0 0 30 2,3 *", "2027-03-30", "2028-03-30"),
        # cronsim's L family, documented in docs/api.md.
        ("0 0 L * *", "2026-12-31", "2027-01-31"),
        ("0 0 L 2 *", "2027-02-28", "2028-02-29"),
        ("0 0 LW * *", "2026-12-31", "2027-01-29"),  # Jan 31 2027 is a Sunday
        ("0 0 * * 5L", "2026-12-25", "2027-01-29"),
        ("0 0 * * fri#2", "2026-12-11", "2027-01-08"),
        # Monday to Sunday, ended with 7 (as the refusal of mon-sun says).
        ("0 0 * * mon-7", "2026-12-07", "2026-12-08"),
        ("0 0 * * sun-mon", "2026-12-07", "2026-12-13"),
    ],
)
def test_cron_extensions_and_rare_dates_run_when_they_should(
    cron: str, first: str, then: str
) -> None:
    assert parse_cron(cron) == cron
    at = next_occurrence(cron, "UTC", DEC_6)
    assert [at.date().isoformat(), next_occurrence(cron, "UTC", at).date().isoformat()] == [
        first,
        then,
    ]


# The nights the clocks change in Paris in 2026: forward at 02:00 CET on 29 March, back at
# 03:00 CEST on 25 October.
SPRING = datetime(2026, 3, 28, 23, tzinfo=UTC)  # 00:00 CET, 29 March
AUTUMN = datetime(2026, 10, 24, 22, tzinfo=UTC)  # 00:00 CEST, 25 October


@pytest.mark.parametrize(
    ("cron", "spring", "autumn"),
    [
        # Neither field starts with `*`: a skipped time runs after the gap, a repeated one once.
        ("30 2 * * *", ["03:00+02"], ["02:30+02"]),
        ("0-59/15 2 * * *", ["03:00+02"], ["02:00+02", "02:15+02", "02:30+02", "02:45+02"]),
        ("0,15,30,45 2 * * *", ["03:00+02"], ["02:00+02", "02:15+02", "02:30+02", "02:45+02"]),
        # One does: the clock as it reads, none in a skipped hour, both of a repeated one.
        ("*/15 2 * * *", [], ["02:00+02", "02:15+02", "02:30+02", "02:45+02",
                              "02:00+01", "02:15+01", "02:30+01", "02:45+01"]),
        ("0 */2 * * *", ["00:00+01", "04:00+02"], ["00:00+02", "02:00+02", "02:00+01", "04:00+01"]),
        ("0 * * * *", ["00:00+01", "01:00+01", "03:00+02", "04:00+02"],
         ["00:00+02", "01:00+02", "02:00+02", "02:00+01", "03:00+01", "04:00+01"]),
    ],
)  # fmt: skip
def test_daylight_saving_follows_debians_rule_as_the_docs_give_it(
    cron: str, spring: list[str], autumn: list[str]
) -> None:
    """docs/api.md's examples: each occurrence from local midnight to 04:59 of each night."""
    for night, expected in ((SPRING, spring), (AUTUMN, autumn)):
        seen = []
        for at in occurrences_after(cron, "Europe/Paris", night - timedelta(seconds=1)):
            if at.hour >= 5 or at - night > timedelta(hours=6):  # (past that night's 04:59)
                break
            seen.append(at.strftime("%H:%M%z")[:-2])
        assert seen == expected, night
