"""Signed hash chains: what `audit verify` reports about signatures (forged, unsigned),
which record a worker continues a chain from, hash compatibility with records written
before signing existed, and the worker's chain key in a real (encrypted-file) keychain."""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from agentstream.agents.audit.verify import ChainTrust, chain_record, check_chain
from agentstream.agents.security.decisions import seal_record
from agentstream.schemas import Event, PolicyDecision, encode, registry
from agentstream.schemas.security import Verdict
from agentstream.streams import audit_chain, signing
from agentstream.streams.audit_chain import (
    GENESIS,
    ChainSigner,
    _HeadScan,
    compute_hash,
    load_chain_key,
    record_hash,
    seal,
)
from agentstream.streams.credentials import KeychainCredentialsProvider
from agentstream.streams.settings import Settings


def signer(key_id: str = "worker") -> ChainSigner:
    return ChainSigner(key_id, signing.new_private_key())


WORKER = signer()
TRUST = ChainTrust({WORKER.key_id: WORKER.public_key})


def decision(i: int) -> Event[PolicyDecision]:
    return Event.of(
        PolicyDecision(
            message_id=f"m{i}",
            message_event_id=f"e{i}",
            sender_id="agent-1",
            verdict=Verdict.ALLOW if i % 2 else Verdict.DENY,
            reasons=[f"r{i}"],
            policies={"p": 1},
            policy_signers={"p": "admin"},
            evaluated_at=datetime(2026, 1, 1, tzinfo=UTC),
            evaluation_us=i,
        ),
        source="enforce_policy",
    )


def batches(sizes: list[int], by: ChainSigner | None = WORKER, start: int = 0) -> list[bytes]:
    """A chain written as a worker's fast path writes it: each batch's last record signed."""
    out: list[bytes] = []
    prev, i = GENESIS, start
    for size in sizes:
        for j in range(size):
            record = decision(i).model_dump(mode="json")
            value, prev = seal_record(record, prev, by if j == size - 1 else None)
            out.append(value)
            i += 1
    return out


def append(chain: list[bytes], i: int, by: ChainSigner | None = None) -> bytes:
    """What a forger with produce access can write: the next record, chained with the
    project's own hashing to the newest one (and signed with whatever key it has)."""
    prev = orjson.loads(chain[-1])["payload"]["hash"]
    return encode(seal(decision(i), prev, by))


def walk(
    values: list[bytes],
    trust: ChainTrust = TRUST,
    *,
    require: bool = False,
    following: list[bytes] = (),  # type: ignore[assignment]
) -> list[tuple[str, int]]:
    recs = [chain_record(off, v) for off, v in enumerate(values)]
    after = [chain_record(len(values) + k, v) for k, v in enumerate(following)]
    found = check_chain(recs, GENESIS, trust=trust, require_signatures=require, following=after)
    return [(f.kind, f.offset) for f in found]


def details(values: list[bytes], trust: ChainTrust = TRUST) -> dict[int, str]:
    recs = [chain_record(off, v) for off, v in enumerate(values)]
    return {f.offset: f.detail for f in check_chain(recs, GENESIS, trust=trust)}


# -- what verify reports -------------------------------------------------------------------
def test_batches_signed_only_at_their_end_vouch_for_every_record() -> None:
    chain = batches([5, 1, 7, 3])
    assert sum(1 for v in chain if orjson.loads(v)["payload"]["signature"]) == 4
    assert walk(chain) == []


def test_forged_append_with_a_correct_hash_is_unsigned() -> None:
    chain = batches([4, 4])
    chain.append(append(chain, 99))
    # the bare chain is intact: only the missing signature gives it away
    recs = [chain_record(off, v) for off, v in enumerate(chain)]
    assert [f.kind for f in check_chain(recs, GENESIS, trust=TRUST)] == ["unsigned"]
    assert walk(chain) == [("unsigned", 8)]
    assert "no validly signed record after it" in details(chain)[8]


def test_forged_append_the_worker_continued_past_is_one_unsigned_finding() -> None:
    """The forgery, then the worker's next batch linked to the last genuine record."""
    chain = batches([3, 3])
    head = orjson.loads(chain[-1])["payload"]["hash"]
    chain.append(append(chain, 99))
    value, prev = seal_record(decision(50).model_dump(mode="json"), head)
    chain.append(value)
    value, _ = seal_record(decision(51).model_dump(mode="json"), prev, WORKER)
    chain.append(value)
    assert walk(chain) == [("unsigned", 6)]
    assert "the record before it" in details(chain)[6]  # skipped by the chain, said so


def test_append_signed_with_an_unknown_key_is_forged() -> None:
    chain = batches([4])
    chain.append(append(chain, 99, signer("worker-eve")))
    assert walk(chain) == [("forged", 4)]
    assert "not a trusted chain key" in details(chain)[4]


def test_append_claiming_the_workers_key_id_is_forged() -> None:
    chain = batches([4])
    chain.append(append(chain, 99, signer("worker")))  # same id, another key
    assert walk(chain) == [("forged", 4)]
    assert "does not verify" in details(chain)[4]


def test_tampered_signature_is_forged_and_leaves_its_batch_unsigned() -> None:
    chain = batches([3, 3])
    data = orjson.loads(chain[5])
    sig = data["payload"]["signature"]
    data["payload"]["signature"] = ("B" if sig[0] != "B" else "C") + sig[1:]
    chain[5] = orjson.dumps(data)
    assert walk(chain) == [("unsigned", 3), ("unsigned", 4), ("forged", 5)]
    assert "is forged" in details(chain)[3]


def test_signature_by_an_untrusted_key_is_forged() -> None:
    other = signer("worker-2")
    chain = batches([2, 2], by=other)
    assert walk(chain, ChainTrust({other.key_id: other.public_key})) == []
    assert walk(chain) == [("unsigned", 0), ("forged", 1), ("unsigned", 2), ("forged", 3)]
    pinned = ChainTrust({WORKER.key_id: WORKER.public_key}, source="pinned")
    assert "not among the pinned" in details(chain, pinned)[1]


def test_revoked_key_is_forged_with_the_reason() -> None:
    chain = batches([2])
    revoked = ChainTrust({}, revoked=frozenset({"worker"}))
    assert walk(chain, revoked) == [("unsigned", 0), ("forged", 1)]
    assert "revoked" in details(chain, revoked)[1]


def test_unsigned_tail_of_a_crashed_batch_is_reported_unsigned() -> None:
    chain = batches([3, 4])[:-2]  # the batch's signed last record never reached the broker
    assert walk(chain) == [("unsigned", 3), ("unsigned", 4)]


def test_stripped_signature_changes_no_hash_and_is_covered_by_the_next_batch() -> None:
    chain = batches([3, 3])
    data = orjson.loads(chain[2])
    data["payload"]["signature"] = ""
    chain[2] = orjson.dumps(data)
    assert walk(chain) == []  # the next batch's signature vouches through prev_hash
    # stripped off the only signed record, a partition looks like one written before
    # signing: hence signatures are required (by default) once a chain key is trusted
    assert walk(chain[:3]) == []
    assert walk(chain[:3], require=True) == [("unsigned", 0), ("unsigned", 1), ("unsigned", 2)]


def test_altered_record_in_a_signed_batch_is_altered_only() -> None:
    chain = batches([4, 2])
    chain[1] = chain[1].replace(b'"verdict":"allow"', b'"verdict":"deny"')
    assert walk(chain) == [("altered", 1)]


def test_signer_id_is_covered_by_the_hash() -> None:
    chain = batches([2])
    chain[1] = chain[1].replace(b'"signed_by":"worker"', b'"signed_by":"worker-2"')
    assert ("altered", 1) in walk(chain)


def test_range_ending_mid_batch_is_vouched_by_the_records_after_it() -> None:
    chain = batches([4, 4])
    assert walk(chain[:6]) == [("unsigned", 4), ("unsigned", 5)]
    assert walk(chain[:6], following=chain[6:]) == []


def test_old_unsigned_chain_verifies_and_is_reported_when_signatures_are_required() -> None:
    chain = batches([3, 3], by=None)
    assert walk(chain) == []
    assert walk(chain, require=True) == [("unsigned", i) for i in range(6)]


def test_first_signature_after_an_upgrade_vouches_for_the_history() -> None:
    old = batches([4], by=None)
    prev = orjson.loads(old[-1])["payload"]["hash"]
    value, _ = seal_record(decision(9).model_dump(mode="json"), prev, WORKER)
    assert walk([*old, value], require=True) == []


# -- hashing ---------------------------------------------------------------------------
def old_style(i: int, prev: str) -> bytes:
    """A decision as written before this commit: no signature fields and none of the
    fields added with them, sealed as sha256 of the sorted JSON with hash = ""."""
    data = decision(i).model_dump(mode="json")
    for name in (
        "verified",
        "claimed_role",
        "roles",
        "issued_at",
        "policy_signers",
        "signed_by",
        "signature",
    ):
        del data["payload"][name]
    data["payload"]["prev_hash"] = prev
    data["payload"]["hash"] = ""
    digest = hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()
    data["payload"]["hash"] = digest
    return orjson.dumps(data)


def test_record_sealed_before_the_new_fields_still_verifies() -> None:
    chain, prev = [], GENESIS
    for i in range(3):
        chain.append(old_style(i, prev))
        prev = orjson.loads(chain[-1])["payload"]["hash"]
    assert walk(chain) == []
    # re-dumping the decoded model would add the new fields and report it altered
    ev = registry.decode(chain[0])
    assert compute_hash(ev) != ev.payload.hash == record_hash(orjson.loads(chain[0]))
    # and a signed chain continues from it
    value, _ = seal_record(decision(5).model_dump(mode="json"), prev, WORKER)
    assert walk([*chain, value], require=True) == []


def test_fast_path_and_pydantic_seal_agree_with_a_signature() -> None:
    ev = decision(3)
    value, digest = seal_record(ev.model_dump(mode="json"), "ab" * 32, WORKER)
    sealed = seal(ev, "ab" * 32, WORKER)
    assert registry.decode(value) == sealed  # Ed25519 signatures are deterministic
    assert digest == sealed.payload.hash == record_hash(orjson.loads(encode(sealed)))
    assert sealed.payload.signed_by == "worker"
    assert (
        audit_chain.signature_problem(
            sealed.payload.model_dump(), digest, {"worker": WORKER.public_key}
        )
        is None
    )


def test_signature_is_excluded_from_the_hash_but_present_key_stays() -> None:
    data = orjson.loads(batches([1])[0])
    h = record_hash(data)
    data["payload"]["signature"] = "x"
    assert record_hash(data) == h
    del data["payload"]["signature"]
    assert record_hash(data) != h  # a record's fields are what its hash covers


# -- where a worker continues a chain ---------------------------------------------------------
def head_of(values: list[bytes], trusted: dict[str, Any]) -> str | None:
    """`last_hash`'s choice over one window holding `values` (the whole partition)."""
    scan = _HeadScan(trusted)
    for off, value in enumerate(values):
        scan.see(off, value)
    scan.end_window(len(values))
    if scan.head is not None:
        return scan.head
    return scan.signed or scan.sealed


def hash_at(values: list[bytes], i: int) -> str:
    return str(orjson.loads(values[i])["payload"]["hash"])


MINE = {WORKER.key_id: WORKER.public_key}


def test_worker_continues_from_the_last_record_it_can_verify() -> None:
    chain = batches([3, 3])
    assert head_of(chain, MINE) == hash_at(chain, 5)
    forged = [*chain, append(chain, 99)]
    assert head_of(forged, MINE) == hash_at(chain, 5)  # the unsigned append is skipped
    forged = [*chain, append(chain, 99, signer("worker"))]
    assert head_of(forged, MINE) == hash_at(chain, 5)  # so is a bad signature
    crashed = chain[:-1]
    assert head_of(crashed, MINE) == hash_at(chain, 2)  # a cut batch is abandoned


def test_chain_written_before_signing_continues_from_its_newest_record() -> None:
    chain = batches([3, 3], by=None)
    assert head_of(chain, MINE) == hash_at(chain, 5)


def test_signatures_by_keys_not_trusted_never_adopt_an_unsigned_tail() -> None:
    other = signer("worker-2")
    chain = batches([3, 3], by=other)
    assert head_of([*chain, append(chain, 99)], MINE) == hash_at(chain, 5)


# -- the chain key in the keychain ----------------------------------------------------------
def keychain_settings(tmp_path: Path, **kw: Any) -> Settings:
    values: dict[str, Any] = {
        "keyring_backend": "encrypted-file",
        "keyring_file": tmp_path / "keyring.json",
        "keyring_password": "master-pw",
        "keyring_service": "agentstream-test",
    }
    values.update(kw)
    return Settings.model_validate(values)


async def test_chain_key_is_created_once_and_kept(tmp_path: Path) -> None:
    settings = keychain_settings(tmp_path, chain_key_id="w1")
    first, created = await load_chain_key(settings)
    assert created and first.key_id == "w1"
    again, created = await load_chain_key(settings)
    assert not created and again.public_b64 == first.public_b64
    stored = await KeychainCredentialsProvider(settings).get_secret("chain_key.w1")
    assert stored is not None and stored not in (tmp_path / "keyring.json").read_text()
    with pytest.raises(signing.SigningError):
        await load_chain_key(settings, "absent", create=False)


async def test_worker_without_a_keychain_keeps_running_unsigned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(audit_chain, "_SIGNER", audit_chain._SignerState())
    settings = keychain_settings(tmp_path, keyring_file=None)  # encrypted-file, no file
    caplog.set_level(logging.ERROR)
    assert await audit_chain.chain_signer(settings) is None
    assert "UNSIGNED" in caplog.text
    status, detail = await audit_chain._chain_key_health()
    assert status == "degraded" and "unavailable" in detail
    assert await audit_chain.chain_signer(settings) is None  # not retried at once


async def test_worker_creates_its_chain_key_and_logs_what_to_publish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(audit_chain, "_SIGNER", audit_chain._SignerState())
    settings = keychain_settings(tmp_path)
    caplog.set_level(logging.WARNING)
    found = await audit_chain.chain_signer(settings)
    assert found is not None and found.key_id == "worker"
    assert "agentstream audit worker-key publish --key-id worker" in caplog.text
    assert f"worker={found.public_b64}" in caplog.text
    assert await audit_chain.chain_signer(settings) is found


class _VirtualClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class _UnsignedPartition:
    """A consumer over a partition of `n` sealed, unsigned records (a chain written
    before signing), reading `rate` records per second of the virtual clock."""

    VALUE = b'{"payload":{"hash":"ab","prev_hash":"cd"}}'

    def __init__(self, n: int, rate: float, clock: _VirtualClock) -> None:
        self.n, self.rate, self.clock, self.pos, self.read = n, rate, clock, 0, 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def assign(self, tps: Any) -> None:
        return None

    async def end_offsets(self, tps: Any) -> Any:
        return {tps[0]: self.n}

    async def beginning_offsets(self, tps: Any) -> Any:
        return {tps[0]: 0}

    def seek(self, tp: Any, offset: int) -> None:
        self.pos = offset

    async def position(self, tp: Any) -> int:
        return self.pos

    async def getmany(self, tp: Any, timeout_ms: int = 0) -> Any:
        import asyncio
        from types import SimpleNamespace

        k = min(8192, self.n - self.pos)
        self.clock.t += k / self.rate
        await asyncio.sleep(0)
        recs = [SimpleNamespace(offset=self.pos + i, value=self.VALUE) for i in range(k)]
        self.pos += k
        self.read += k
        return {tp: recs}


async def test_the_head_search_of_a_long_unsigned_chain_keeps_to_its_limits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1.5M unsigned records read at 20k/s: the limits (SCAN_LIMIT records,
    SCAN_BUDGET_S) were checked only between windows, so the sixth window (up to 2M
    records) was read whole, past the 60 s timeout: every lookup raised BrokerError,
    nothing was remembered, and the partition's chain could never be continued."""
    import asyncio
    from types import SimpleNamespace

    loop = asyncio.get_running_loop()
    clock = _VirtualClock(loop.time())
    monkeypatch.setattr(loop, "time", clock)
    audit_chain._UNSIGNED_BELOW.pop(("t", 0), None)
    made: list[_UnsignedPartition] = []

    def consumer(*args: Any, **kwargs: Any) -> _UnsignedPartition:
        made.append(_UnsignedPartition(1_500_000, 20_000.0, clock))
        return made[-1]

    monkeypatch.setattr(audit_chain, "group_less_consumer", consumer)
    try:
        await audit_chain.last_hash(SimpleNamespace(), "t", 0)  # within its timeout
        assert made[0].read <= audit_chain.SCAN_LIMIT
        assert ("t", 0) in audit_chain._UNSIGNED_BELOW  # not searched again
    finally:
        audit_chain._UNSIGNED_BELOW.pop(("t", 0), None)
