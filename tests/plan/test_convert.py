"""Value conversion: PocketBase storage values (as SQLite returns them) to PostgreSQL values."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pbmigrate.plan.convert import Reject, converter_for
from pbmigrate.source.catalog import Field


def conv(ftype: str, **kw):
    return converter_for(Field(kw.pop("name", "f"), ftype, **kw))


def test_dates_parse_pocketbase_format_and_lenient_variants_to_utc():
    c = conv("date")
    assert c("2024-01-02 03:04:05.123Z") == datetime(2024, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)
    assert c("2024-06-30T10:00:00+02:00") == datetime(2024, 6, 30, 8, 0, tzinfo=UTC)
    assert c("2024-06-30") == datetime(2024, 6, 30, tzinfo=UTC)
    assert c("") is None and c(None) is None


def test_bad_date_is_rejected_with_field_and_value():
    with pytest.raises(Reject) as e:
        conv("date", name="published")("2024-13-45 99:00:00Z")
    assert e.value.field == "published"
    assert "not a date" in e.value.reason and "2024-13-45" in e.value.reason


def test_required_empty_date_is_rejected():
    with pytest.raises(Reject, match="required"):
        conv("date", required=True)("")


def test_only_int_numbers_become_int_and_fractions_are_rejected():
    c = conv("number", only_int=True)
    assert c(42) == 42 and c(42.0) == 42 and c(None) == 0
    assert c(9007199254740992) == 9007199254740992
    with pytest.raises(Reject, match="fraction"):
        c(1.5)


def test_numbers_keep_float_and_reject_text():
    c = conv("number")
    assert c(3.14) == 3.14 and c(42) == 42.0 and c(None) == 0.0
    with pytest.raises(Reject, match="not a number"):
        c("abc")


@pytest.mark.parametrize(("raw", "expected"), [(1, True), (0, False), ("true", True), ("0", False), (None, False)])
def test_bools_accept_integers_and_text(raw, expected):
    assert conv("bool")(raw) is expected


def test_json_handles_sqlite_numeric_affinity_and_both_nulls():
    c = conv("json")
    assert c(123) == "123"  # SQLite hands back the int for a json field holding 123
    assert c(1.5) == "1.5"
    assert c("true") == "true"
    assert c('"hello"') == '"hello"'
    assert c(None) is None and c("null") is None
    assert c('[\r\n  1,\r\n  2\r\n]') == "[1, 2]"  # what jsonb prints, and its checksum form
    assert c('{"bb": 1, "a": {"z": 1.50, "y": null}}') == '{"a": {"y": null, "z": 1.50}, "bb": 1}'


@pytest.mark.parametrize("raw", ['{"a":', "NaN", '{"k":"x\\u0000y"}'])
def test_json_rejects_invalid_nan_and_nul(raw):
    with pytest.raises(Reject):
        conv("json")(raw)


def test_text_rejects_nul_bytes_but_keeps_unicode_and_empty():
    c = conv("text")
    assert c('Hello "world" ünïcødé') == 'Hello "world" ünïcødé'
    assert c("") == "" and c(None) == ""
    with pytest.raises(Reject, match="NUL"):
        c("a\x00b")


def test_secret_reject_reason_never_quotes_the_value():
    with pytest.raises(Reject) as e:
        conv("password", name="password")("$2a$10$secret\x00hash")
    assert "secret" not in e.value.reason.replace("secret value withheld", "")
    assert "$2a$" not in e.value.reason


def test_multi_values_keep_order_and_check_select_values():
    c = conv("select", multi=True, values=("a", "b", "c"))
    assert c('["c","a"]') == ["c", "a"]
    assert c("[]") == [] and c("") == []
    with pytest.raises(Reject, match="not one of"):
        c('["a","z"]')
    with pytest.raises(Reject, match="not a JSON array"):
        c("[1,")
    with pytest.raises(Reject, match="not UTF-8"):  # a BLOB in the column: a reject, not a crash
        c(b"\xff[]")


def test_multi_relation_ids_parse_exactly_whatever_the_json_spelling():
    c = conv("relation", multi=True, target="x")
    assert c('["a","b"]') == ["a", "b"] and c('["a", "b"]') == ["a", "b"]
    assert c('["a\\tb"]') == ["a\tb"]  # an escaped tab is a tab
    with pytest.raises(Reject, match="not a JSON array"):
        c('["a\tb"]')  # a raw tab is not JSON


def test_single_select_empty_is_null_and_unknown_value_is_rejected():
    c = conv("select", values=("draft", "published"))
    assert c("published") == "published" and c("") is None
    with pytest.raises(Reject):
        c("archived")


def test_single_relation_empty_is_null():
    assert conv("relation", target="x")("") is None
    assert conv("relation", target="x")("9ehtgmzutk6xovk") == "9ehtgmzutk6xovk"


def test_geopoint_becomes_point_and_defaults_to_origin():
    c = conv("geoPoint")
    assert c('{"lon":23.32,"lat":42.69}') == (23.32, 42.69)
    assert c('{"lat":0,"lon":0}') == (0.0, 0.0)
    with pytest.raises(Reject):
        c('{"x":1}')


def test_secret_fields_may_be_missing_in_api_mode():
    f = Field("password", "password", hidden=True)
    assert converter_for(f, has_secrets=False)(None) is None
    assert converter_for(f, has_secrets=True)(None) == ""
