"""router_svc.sealing: the AEAD that seals the encrypted_content the gateway mints."""

from __future__ import annotations

import base64
import logging

import pytest

from router_svc import errors, sealing

KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.urlsafe_b64encode(b"\xfb" * 32).decode().rstrip("=")


def test_round_trip_binds_tenant_and_purpose() -> None:
    sealer = sealing.Sealer(sealing.parse_keys(f"one={KEY_A}"))
    sealed = sealer.seal("héllo", tenant="acme", purpose=sealing.REASONING)
    assert sealed.startswith("rgw1.one.")
    assert "héllo" not in sealed
    assert sealer.open(sealed, tenant="acme", purpose=sealing.REASONING) == "héllo"
    assert sealer.open(sealed, tenant="globex", purpose=sealing.REASONING) is None
    assert sealer.open(sealed, tenant="acme", purpose=sealing.COMPACTION) is None
    # Two seals of one text differ (a fresh nonce each time).
    assert sealer.seal("x", tenant="t", purpose="p") != sealer.seal("x", tenant="t", purpose="p")


@pytest.mark.parametrize(
    "content",
    [
        "",
        "gAAAAB",
        "rgw1.",
        "rgw1.one",
        "rgw1.one.",
        "rgw1.one.AAAA",
        "rgw1.two.AAAAAAAAAAAAAAAAAA",
    ],
)
def test_what_is_not_ours_does_not_open(content: str) -> None:
    sealer = sealing.Sealer(sealing.parse_keys(f"one={KEY_A}"))
    assert sealer.open(content, tenant="t", purpose="p") is None


def test_every_bit_is_checked() -> None:
    sealer = sealing.Sealer(sealing.parse_keys(f"one={KEY_A}"))
    sealed = sealer.seal("text", tenant="t", purpose="p")
    raw = bytearray(base64.urlsafe_b64decode(sealed[len("rgw1.one.") :] + "=="))
    for i in range(len(raw)):
        changed = bytearray(raw)
        changed[i] ^= 1
        body = base64.urlsafe_b64encode(bytes(changed)).decode().rstrip("=")
        assert sealer.open(f"rgw1.one.{body}", tenant="t", purpose="p") is None


def test_rotation_first_key_seals_all_open() -> None:
    old = sealing.Sealer(sealing.parse_keys(f"old={KEY_A}"))
    sealed_old = old.seal("kept", tenant="t", purpose="p")
    rotated = sealing.Sealer(sealing.parse_keys(f"new={KEY_B}, old={KEY_A}"))
    assert rotated.open(sealed_old, tenant="t", purpose="p") == "kept"
    assert rotated.seal("x", tenant="t", purpose="p").startswith("rgw1.new.")
    retired = sealing.Sealer(sealing.parse_keys(f"new={KEY_B}"))
    assert retired.open(sealed_old, tenant="t", purpose="p") is None


def test_open_or_refuse_is_a_400_naming_the_item() -> None:
    sealer = sealing.Sealer(sealing.parse_keys(f"one={KEY_A}"))
    with pytest.raises(errors.InvalidRequest) as refused:
        sealer.open_or_refuse("nope", tenant="t", purpose="p", param="input[3].encrypted_content")
    assert refused.value.status == 400
    assert refused.value.param == "input[3].encrypted_content"
    assert refused.value.code == "invalid_encrypted_content"


@pytest.mark.parametrize(
    "spec",
    [
        "nokey",
        f"bad id={KEY_A}",
        "one=%%%",
        f"one={base64.b64encode(b'short').decode()}",
        f"one={KEY_A},one={KEY_B}",
    ],
)
def test_bad_settings_are_refused_without_showing_keys(spec: str) -> None:
    with pytest.raises(ValueError) as refused:
        sealing.parse_keys(spec)
    assert KEY_A not in str(refused.value)


def test_no_keys_makes_a_random_one_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    assert sealing.parse_keys(" , ") == []
    with caplog.at_level(logging.WARNING, logger="router_svc.sealing"):
        a = sealing.Sealer.from_setting("")
        b = sealing.Sealer.from_setting("")
    assert sum("--seal-keys" in r.getMessage() for r in caplog.records) == 2  # once per router
    sealed = a.seal("x", tenant="t", purpose="p")
    assert a.open(sealed, tenant="t", purpose="p") == "x"
    assert b.open(sealed, tenant="t", purpose="p") is None  # another replica, another key
    # ...under another key id, so the content is known not to be this router's.
    envelope = sealing.envelope(sealed)
    assert envelope is not None and envelope.key_id.startswith("auto-")
    assert a.knows(envelope) and not b.knows(envelope)


def test_a_ref_is_in_the_clear_and_bound_to_the_seal() -> None:
    sealer = sealing.Sealer(sealing.parse_keys(f"one={KEY_A}"))
    sealed = sealer.seal("summary", tenant="t", purpose=sealing.COMPACTION, ref="cmp_12ab")
    assert sealed.startswith("rgw1.one.") and sealed.endswith(".cmp_12ab")
    assert sealing.envelope(sealed) == sealing.Envelope("one", sealed.split(".")[2], "cmp_12ab")
    assert sealer.open(sealed, tenant="t", purpose=sealing.COMPACTION) == "summary"
    # Another ref, or none, does not open: the ref cannot be swapped under a known key.
    assert sealer.open(sealed[: -len("12ab")] + "12ac", tenant="t", purpose="compaction") is None
    assert sealer.open(sealed.rpartition(".")[0], tenant="t", purpose="compaction") is None
    assert sealer.open(sealed, tenant="u", purpose=sealing.COMPACTION) is None
    # Content sealed without a ref still opens as before (items made before refs existed).
    plain = sealer.seal("old", tenant="t", purpose=sealing.COMPACTION)
    assert sealing.envelope(plain) == sealing.Envelope("one", plain.split(".")[2], "")
    assert sealer.open(plain, tenant="t", purpose=sealing.COMPACTION) == "old"
    with pytest.raises(ValueError):
        sealer.seal("x", tenant="t", purpose="p", ref="not.a.ref")


@pytest.mark.parametrize(
    "content", ["", "gAAAAB", "rgw1.", "rgw1..AAAA", "rgw1.one.AAAA.bad ref", "rgw1.one.AA.a.b"]
)
def test_what_has_not_the_sealed_form_has_no_envelope(content: str) -> None:
    assert sealing.envelope(content) is None
