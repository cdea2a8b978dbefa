"""JoseTokenVerifier: one table of tokens, each with the exact outcome (a stable code or exact Claims)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jws

from adapters.jwt import JoseTokenVerifier, mint_token
from adapters.system import SystemClock
from domain.model.errors import AuthError
from domain.model.identity import Claims
from domain.model.ports import Clock
from tests.defaults import DEFAULTS

NOW = 1_767_000_000
SECRET = "test-secret-with-more-than-32-bytes!"
ISSUER = "https://dwp.example/auth"
AUDIENCE = "aura"
KID = "key-1"
LEEWAY = 30


class FixedClock(Clock):
    def __init__(self, now: float) -> None:
        self._now = now

    def now(self) -> float:
        return self._now


@dataclass(frozen=True)
class Keys:
    private_pem: str
    public_pem: str
    other_private_pem: str


def _rsa_private_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="module")
def keys() -> Keys:
    # Generating RSA keys is the slow part: twice per module, not per case.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Keys(_rsa_private_pem(key), public_pem.decode(), _rsa_private_pem(other))


def jose_verifier(**options: Any) -> JoseTokenVerifier:
    """A verifier with the settings' defaults for what a case does not name."""
    defaults = {"leeway_seconds": DEFAULTS.auth.leeway_seconds,
                "max_token_age_seconds": DEFAULTS.auth.max_token_age_seconds,
                "verified_cache_size": DEFAULTS.auth.verified_token_cache_size, "clock": SystemClock()}
    return JoseTokenVerifier(**(defaults | options))


def make_verifier(name: str, keys: Keys) -> JoseTokenVerifier:
    clock = FixedClock(NOW)
    if name == "hs":
        return jose_verifier(
            algorithms=["HS256"], secret=SECRET, issuer=ISSUER, audience=AUDIENCE, key_id=KID, clock=clock
        )
    if name == "rs":
        return jose_verifier(
            algorithms=["RS256"],
            public_key=keys.public_pem,
            issuer=ISSUER,
            audience=AUDIENCE,
            key_id=KID,
            clock=clock,
        )
    if name == "hs_open":  # no issuer, audience or key id configured
        return jose_verifier(algorithms=["HS256"], secret=SECRET, clock=clock)
    raise AssertionError(name)


# --- building tokens, including the ones no honest library would build -------------------------

DROP = object()  # a claim override that removes the claim


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "u1",
        "tenant_id": "t1",
        "exp": NOW + 600,
        "iat": NOW - 5,
        "email": "u1@example.com",
        "role": "user",
        "iss": ISSUER,
        "aud": AUDIENCE,
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not DROP}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def as_json(part: Mapping[str, Any] | bytes) -> bytes:
    return part if isinstance(part, bytes) else json.dumps(part).encode()


def compact(header: Mapping[str, Any] | bytes, payload: Mapping[str, Any] | bytes, signature: bytes) -> str:
    return f"{b64(as_json(header))}.{b64(as_json(payload))}.{b64(signature)}"


def hmac_signed(
    header: Mapping[str, Any] | bytes, payload: Mapping[str, Any] | bytes, key: str | bytes = SECRET
) -> str:
    """HS256 by hand: works with any header, payload and key (python-jose refuses a PEM as key)."""
    signing_input = f"{b64(as_json(header))}.{b64(as_json(payload))}"
    raw_key = key.encode() if isinstance(key, str) else key
    signature = hmac.new(raw_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def hs(payload: Mapping[str, Any], *, alg: str = "HS256", secret: str = SECRET, headers: Any = None) -> str:
    token: str = jws.sign(dict(payload), secret, headers=headers, algorithm=alg)
    return token


def rs(payload: Mapping[str, Any], private_pem: str, *, headers: Any = None) -> str:
    token: str = jws.sign(dict(payload), private_pem, headers=headers, algorithm="RS256")
    return token


def replace_segment(token: str, index: int, segment: str) -> str:
    parts = token.split(".")
    parts[index] = segment
    return ".".join(parts)


# --- the table -----------------------------------------------------------------------------------


def expected_claims(**extra: Any) -> Claims:
    return Claims(
        sub="u1",
        tenant_id="t1",
        exp=NOW + 600,
        iat=NOW - 5,
        email="u1@example.com",
        role="user",
        extra={"iss": ISSUER, "aud": AUDIENCE, **extra},
    )


@dataclass(frozen=True)
class Case:
    id: str
    token: Callable[[Keys], str]
    expected: str | Claims  # an AuthError code, or the exact Claims of an accepted token
    verifier: str = "hs"
    message: str | None = None  # asserted exactly when given


CASES = [
    # accepted
    Case("hs256 happy path", lambda k: hs(claims(), headers={"kid": KID}), expected_claims()),
    Case("rs256 happy path", lambda k: rs(claims(), k.private_pem, headers={"kid": KID}), expected_claims(), "rs"),
    Case("no kid header accepted (one configured key)", lambda k: hs(claims()), expected_claims()),
    Case(
        "minimal claims: no iat, email, role",
        lambda k: hs({"sub": "u1", "tenant_id": "t1", "exp": NOW + 600}),
        Claims(sub="u1", tenant_id="t1", exp=NOW + 600),
        "hs_open",
    ),
    Case(
        "expired within leeway accepted",
        lambda k: hs(claims(exp=NOW - LEEWAY + 1)),
        Claims("u1", "t1", NOW - LEEWAY + 1, NOW - 5, "u1@example.com", "user", {"iss": ISSUER, "aud": AUDIENCE}),
    ),
    Case(
        "nbf in the future within leeway accepted",
        lambda k: hs(claims(nbf=NOW + LEEWAY)),
        expected_claims(nbf=NOW + LEEWAY),
    ),
    Case(
        "aud list containing ours accepted",
        lambda k: hs(claims(aud=["other", AUDIENCE])),
        Claims("u1", "t1", NOW + 600, NOW - 5, "u1@example.com", "user", {"iss": ISSUER, "aud": ["other", AUDIENCE]}),
    ),
    Case(
        "float times accepted, rounded down to int",
        lambda k: hs(claims(exp=NOW + 600.9, iat=NOW - 4.5)),
        Claims("u1", "t1", NOW + 600, NOW - 5, "u1@example.com", "user", {"iss": ISSUER, "aud": AUDIENCE}),
    ),

    Case(
        "iss and aud ignored when not configured",
        lambda k: hs(claims(iss="someone-else", aud=["other"], jti="j1")),
        Claims(
            "u1",
            "t1",
            NOW + 600,
            NOW - 5,
            "u1@example.com",
            "user",
            {"iss": "someone-else", "aud": ["other"], "jti": "j1"},
        ),
        "hs_open",
    ),
    # algorithm pinning
    Case(
        "alg none, unsigned", lambda k: compact({"alg": "none", "typ": "JWT"}, claims(), b""), "unsupported_algorithm"
    ),
    Case("alg None, unsigned", lambda k: compact({"alg": "None"}, claims(), b""), "unsupported_algorithm"),
    Case("alg none to rs verifier", lambda k: compact({"alg": "none"}, claims(), b""), "unsupported_algorithm", "rs"),
    Case(
        "hs256 signed with the rsa public key to rs verifier (key confusion)",
        lambda k: hmac_signed({"alg": "HS256", "typ": "JWT", "kid": KID}, claims(), k.public_pem),
        "unsupported_algorithm",
        "rs",
    ),
    Case("hs384 to an hs256-only verifier", lambda k: hs(claims(), alg="HS384"), "unsupported_algorithm"),
    Case("rs256 to an hs256 verifier", lambda k: rs(claims(), k.private_pem), "unsupported_algorithm"),
    Case("alg lower case", lambda k: hmac_signed({"alg": "hs256"}, claims()), "unsupported_algorithm"),
    Case("alg missing", lambda k: hmac_signed({"typ": "JWT"}, claims()), "unsupported_algorithm"),
    Case("alg not a string", lambda k: hmac_signed({"alg": ["HS256"]}, claims()), "unsupported_algorithm"),
    # key id
    Case("unknown kid", lambda k: hs(claims(), headers={"kid": "key-2"}), "unknown_key"),
    Case("kid not a string", lambda k: hs(claims(), headers={"kid": 1}), "unknown_key"),
    Case("unknown kid on rs", lambda k: rs(claims(), k.private_pem, headers={"kid": "x"}), "unknown_key", "rs"),
    # signature
    Case("wrong secret", lambda k: hs(claims(), secret="another-secret-of-more-than-32-bytes"), "invalid_signature"),
    Case("rs256 signed by another key", lambda k: rs(claims(), k.other_private_pem), "invalid_signature", "rs"),
    Case(
        "payload swapped after signing",
        lambda k: replace_segment(hs(claims()), 1, b64(json.dumps(claims(sub="admin")).encode())),
        "invalid_signature",
    ),
    Case("empty signature", lambda k: replace_segment(hs(claims()), 2, ""), "invalid_signature"),
    Case("signature one character short", lambda k: hs(claims())[:-1], "invalid_signature"),
    # shape
    Case("empty", lambda k: "", "malformed_token", message="The bearer token is empty."),
    Case("garbage", lambda k: "this is not a token", "malformed_token"),
    Case("two segments", lambda k: "abc.def", "malformed_token"),
    Case("four segments", lambda k: hs(claims()) + ".abc", "malformed_token"),
    Case("truncated inside the payload", lambda k: hs(claims())[:60], "malformed_token"),
    Case("bearer prefix left on", lambda k: "Bearer " + hs(claims()), "malformed_token"),
    Case("trailing newline", lambda k: hs(claims()) + "\n", "malformed_token"),
    Case("base64 padding characters", lambda k: replace_segment(hs(claims()), 2, "abc="), "malformed_token"),
    Case(
        "oversized",
        lambda k: hs(claims(padding="x" * 9000)),
        "malformed_token",
        message="The bearer token is too large.",
    ),
    Case("header not json", lambda k: hmac_signed(b"{not json", claims()), "malformed_token"),
    Case("header a json array", lambda k: hmac_signed(b'["HS256"]', claims()), "malformed_token"),
    Case("header impossible base64 length", lambda k: replace_segment(hs(claims()), 0, "abcde"), "malformed_token"),
    Case("header not utf-8", lambda k: hmac_signed(b"\xff\xfe{", claims()), "malformed_token"),
    Case("header nested absurdly deep", lambda k: hmac_signed(b"[" * 5000, claims()), "malformed_token"),
    Case(
        "critical header extension",
        lambda k: hs(claims(), headers={"crit": ["b64"], "b64": False}),
        "malformed_token",
    ),
    Case("signed payload not json", lambda k: hmac_signed({"alg": "HS256"}, b"not json"), "malformed_token"),
    Case("signed payload a json array", lambda k: hmac_signed({"alg": "HS256"}, b"[1, 2]"), "malformed_token"),
    # time
    Case("expired", lambda k: hs(claims(exp=NOW - 3600)), "token_expired"),
    # A huge exp must neither overflow nor pass: it is refused as too long-lived.
    Case("huge integer exp", lambda k: hs(claims(exp=10**400)), "token_lifetime_too_long"),
    Case("exp 10^30", lambda k: hs(claims(exp=10**30)), "token_lifetime_too_long"),
    Case("expired exactly at the leeway", lambda k: hs(claims(exp=NOW - LEEWAY)), "token_expired"),
    Case("nbf beyond leeway", lambda k: hs(claims(nbf=NOW + LEEWAY + 1)), "token_not_yet_valid"),
    Case("iat beyond leeway", lambda k: hs(claims(iat=NOW + LEEWAY + 1)), "token_not_yet_valid"),
    # required claims and their types
    Case("no exp", lambda k: hs(claims(exp=DROP)), "missing_claim", message="The token has no 'exp' claim."),
    Case("no sub", lambda k: hs(claims(sub=DROP)), "missing_claim", message="The token has no 'sub' claim."),
    Case(
        "no tenant_id",
        lambda k: hs(claims(tenant_id=DROP)),
        "missing_claim",
        message="The token has no 'tenant_id' claim.",
    ),
    Case(
        "tenant_id a number",
        lambda k: hs(claims(tenant_id=42)),
        "invalid_claim",
        message="Claim 'tenant_id' must be a non-empty string.",
    ),
    Case("tenant_id null", lambda k: hs(claims(tenant_id=None)), "invalid_claim"),
    Case("empty sub", lambda k: hs(claims(sub="")), "invalid_claim", message="Claim 'sub' must be a non-empty string."),
    Case("blank sub", lambda k: hs(claims(sub="   ")), "invalid_claim"),
    Case(
        "exp a numeric string",
        lambda k: hs(claims(exp=str(NOW + 600))),
        "invalid_claim",
        message="Claim 'exp' must be a number of seconds since the epoch.",
    ),
    Case("exp true", lambda k: hs(claims(exp=True)), "invalid_claim"),
    Case("exp infinity", lambda k: hs(claims(exp=float("inf"))), "invalid_claim"),
    Case("iat a string", lambda k: hs(claims(iat="yesterday")), "invalid_claim"),
    Case("nbf a list", lambda k: hs(claims(nbf=[NOW])), "invalid_claim"),
    Case(
        "role not a string",
        lambda k: hs(claims(role=["admin"])),
        "invalid_claim",
        message="Claim 'role' must be a string.",
    ),
    Case("email not a string", lambda k: hs(claims(email=7)), "invalid_claim"),
    # issuer and audience
    Case("wrong iss", lambda k: hs(claims(iss="https://evil.example")), "invalid_issuer"),
    Case("no iss", lambda k: hs(claims(iss=DROP)), "invalid_issuer"),
    Case("iss not a string", lambda k: hs(claims(iss=[ISSUER])), "invalid_claim"),
    Case("wrong aud", lambda k: hs(claims(aud="other")), "invalid_audience"),
    Case("no aud", lambda k: hs(claims(aud=DROP)), "invalid_audience"),
    Case("aud list without ours", lambda k: hs(claims(aud=["a", "b"])), "invalid_audience"),
    Case("aud list with a number", lambda k: hs(claims(aud=[AUDIENCE, 1])), "invalid_claim"),
    Case("wrong aud on rs", lambda k: rs(claims(aud="other"), k.private_pem), "invalid_audience", "rs"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_verify(case: Case, keys: Keys) -> None:
    verifier = make_verifier(case.verifier, keys)
    token = case.token(keys)

    if isinstance(case.expected, Claims):
        assert verifier.verify(token) == case.expected
        return

    with pytest.raises(AuthError) as raised:
        verifier.verify(token)
    assert raised.value.code == case.expected
    assert raised.value.status == 401
    if case.message is not None:
        assert raised.value.message == case.message
    if token:
        assert token not in str(raised.value)
    assert raised.value.__cause__ is None


def test_the_table_covers_every_code() -> None:
    codes = {case.expected for case in CASES if isinstance(case.expected, str)}
    assert codes == {
        "malformed_token",
        "unsupported_algorithm",
        "unknown_key",
        "invalid_signature",
        "token_expired",
        "token_not_yet_valid",
        "token_lifetime_too_long",
        "missing_claim",
        "invalid_claim",
        "invalid_issuer",
        "invalid_audience",
    }


def test_claims_extra_is_read_only(keys: Keys) -> None:
    verified = make_verifier("hs", keys).verify(hs(claims(jti="j1")))
    with pytest.raises(TypeError):
        verified.extra["jti"] = "changed"  # type: ignore[index]


def test_token_of_exactly_max_bytes_is_accepted_one_more_is_not() -> None:
    token = hs(claims())
    at_limit = jose_verifier(algorithms=["HS256"], secret=SECRET, max_token_bytes=len(token), clock=FixedClock(NOW))
    below_limit = jose_verifier(
        algorithms=["HS256"], secret=SECRET, max_token_bytes=len(token) - 1, clock=FixedClock(NOW)
    )

    assert at_limit.verify(token).sub == "u1"
    with pytest.raises(AuthError) as raised:
        below_limit.verify(token)
    assert raised.value.code == "malformed_token"


def test_verifier_pinned_to_several_hs_algorithms_accepts_each() -> None:
    verifier = jose_verifier(algorithms=["HS256", "HS512"], secret=SECRET, clock=FixedClock(NOW))

    assert verifier.verify(hs(claims(), alg="HS512")).tenant_id == "t1"
    with pytest.raises(AuthError) as raised:
        verifier.verify(hs(claims(), alg="HS384"))
    assert raised.value.code == "unsupported_algorithm"


# --- the cache of verified tokens -----------------------------------------------------------------


class MovingClock(Clock):
    def __init__(self, now: float) -> None:
        self.at = now

    def now(self) -> float:
        return self.at


class CountingSignatureChecks:
    """Counts python-jose's signature checks: a token answered from the cache makes none."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = jws.verify

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr("adapters.jwt.verifier.jws.verify", counted)


@pytest.fixture
def signature_checks(monkeypatch: pytest.MonkeyPatch) -> CountingSignatureChecks:
    return CountingSignatureChecks(monkeypatch)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_token_sent_again_gets_the_same_outcome(case: Case, keys: Keys) -> None:
    verifier = make_verifier(case.verifier, keys)
    token = case.token(keys)

    outcomes = []
    for _ in range(3):
        try:
            outcomes.append(verifier.verify(token))
        except AuthError as error:
            outcomes.append((error.code, error.status, error.message))

    first = case.expected if isinstance(case.expected, Claims) else outcomes[0]
    assert outcomes == [first] * 3
    assert verifier.cached_tokens == (1 if isinstance(case.expected, Claims) else 0)


def test_a_token_sent_again_is_verified_once(signature_checks: CountingSignatureChecks, keys: Keys) -> None:
    verifier = make_verifier("hs", keys)
    token = hs(claims(), headers={"kid": KID})

    assert [verifier.verify(token) for _ in range(5)] == [expected_claims()] * 5
    assert signature_checks.calls == 1


def test_a_cached_token_past_its_exp_is_refused_as_an_uncached_one_is(keys: Keys) -> None:
    clock = MovingClock(NOW)
    verifier = jose_verifier(algorithms=["HS256"], secret=SECRET, clock=clock)
    token = hs(claims(exp=NOW + 600))
    verifier.verify(token)
    assert verifier.cached_tokens == 1

    clock.at = NOW + 600 + LEEWAY - 1  # still within the leeway: served from the cache
    assert verifier.verify(token).exp == NOW + 600
    clock.at = NOW + 600 + LEEWAY
    with pytest.raises(AuthError) as cached:
        verifier.verify(token)
    with pytest.raises(AuthError) as uncached:
        jose_verifier(algorithms=["HS256"], secret=SECRET, clock=clock).verify(token)

    assert (cached.value.code, cached.value.status, cached.value.message) == (
        "token_expired", 401, "The token has expired.")
    assert (cached.value.code, cached.value.status, cached.value.message) == (
        uncached.value.code, uncached.value.status, uncached.value.message)
    assert cached.value.__cause__ is None
    assert verifier.cached_tokens == 0  # an expired token is dropped, not kept


def test_a_cached_token_is_refused_before_its_nbf_when_the_clock_steps_back(keys: Keys) -> None:
    clock = MovingClock(NOW)
    verifier = jose_verifier(algorithms=["HS256"], secret=SECRET, clock=clock)
    token = hs(claims(nbf=NOW))
    verifier.verify(token)

    clock.at = NOW - LEEWAY - 1
    with pytest.raises(AuthError) as raised:
        verifier.verify(token)
    assert (raised.value.code, raised.value.message) == ("token_not_yet_valid", "The token is not valid yet.")


# (Not the last character: of an HS256 signature's last base64 character only 2 bits are
# signature, the other 4 decode to nothing.)
@pytest.mark.parametrize("from_signature_end", [2, 10, 42])
def test_a_cached_token_with_one_signature_character_changed_is_refused(
        signature_checks: CountingSignatureChecks, keys: Keys, from_signature_end: int) -> None:
    verifier = make_verifier("hs", keys)
    token = hs(claims(), headers={"kid": KID})
    verifier.verify(token)
    at = len(token) - from_signature_end
    changed = token[:at] + ("A" if token[at] != "A" else "B") + token[at + 1:]

    with pytest.raises(AuthError) as raised:
        verifier.verify(changed)
    assert raised.value.code == "invalid_signature"
    assert signature_checks.calls == 2
    assert verifier.cached_tokens == 1


def test_only_verified_tokens_enter_the_cache(keys: Keys) -> None:
    verifier = make_verifier("hs", keys)
    refused = [hs(claims(), secret="another-secret-of-more-than-32-bytes"), hs(claims(exp=NOW - 3600)),
               hs(claims(aud="other")), "garbage", hs(claims(nbf=NOW + 3600))]
    for token in refused:
        with pytest.raises(AuthError):
            verifier.verify(token)
    assert verifier.cached_tokens == 0


def test_the_cache_holds_at_most_its_size_dropping_the_least_recently_used(
        signature_checks: CountingSignatureChecks) -> None:
    verifier = jose_verifier(algorithms=["HS256"], secret=SECRET, clock=FixedClock(NOW), verified_cache_size=2)
    first, second, third = (hs(claims(sub=f"u{index}")) for index in range(3))

    verifier.verify(first)
    verifier.verify(second)
    verifier.verify(first)  # used again: `second` is now the least recently used
    verifier.verify(third)
    assert verifier.cached_tokens == 2
    assert signature_checks.calls == 3

    verifier.verify(first)
    verifier.verify(third)
    assert signature_checks.calls == 3  # both still cached
    verifier.verify(second)
    assert signature_checks.calls == 4  # dropped, so checked again


def test_a_cache_of_size_zero_keeps_nothing(signature_checks: CountingSignatureChecks) -> None:
    verifier = jose_verifier(algorithms=["HS256"], secret=SECRET, clock=FixedClock(NOW), verified_cache_size=0)
    token = hs(claims())

    verifier.verify(token)
    verifier.verify(token)
    assert (verifier.cached_tokens, signature_checks.calls) == (0, 2)


def test_a_new_key_starts_with_an_empty_cache() -> None:
    """The key is fixed for a verifier's lifetime: rotating it builds a new verifier (a restart
    with the new setting), and a token the old one remembers is checked against the new key."""
    old_secret, new_secret = SECRET, "the-rotated-secret-of-more-than-32-bytes"
    token = hs(claims(), secret=old_secret)
    before = jose_verifier(algorithms=["HS256"], secret=old_secret, clock=FixedClock(NOW))
    before.verify(token)
    after = jose_verifier(algorithms=["HS256"], secret=new_secret, clock=FixedClock(NOW))

    assert after.cached_tokens == 0
    with pytest.raises(AuthError) as raised:
        after.verify(token)
    assert raised.value.code == "invalid_signature"


# --- configuration the constructor refuses --------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"algorithms": ["HS256"], "secret": "too-short"}, "at least 32 bytes"),
        ({"algorithms": ["HS256"], "secret": "x" * 31}, "at least 32 bytes"),
        ({"algorithms": ["HS256"], "secret": "é" * 15}, "at least 32 bytes"),  # 30 bytes, 15 characters
        ({"algorithms": ["HS256"], "secret": "x" * 40, "min_secret_bytes": 64}, "at least 64 bytes"),
        ({"algorithms": ["HS256"]}, "need a secret"),
        ({"algorithms": ["HS256"], "secret": ""}, "need a secret"),
        ({"algorithms": ["HS256"], "secret": "", "allow_short_secret": True}, "need a secret"),
        ({"algorithms": ["RS256"]}, "need a public key"),
        ({"algorithms": ["RS256"], "secret": SECRET}, "need a public key"),
        ({"algorithms": ["RS256"], "public_key": "not a pem"}, "not a valid RSA public key"),
        ({"algorithms": ["HS256", "RS256"], "secret": SECRET}, "must not mix"),
        ({"algorithms": ["none"], "secret": SECRET}, "unsupported JWT algorithm"),
        ({"algorithms": ["ES256"], "secret": SECRET}, "unsupported JWT algorithm"),
        ({"algorithms": ["hs256"], "secret": SECRET}, "unsupported JWT algorithm"),
        ({"algorithms": [], "secret": SECRET}, "non-empty list"),
        ({"algorithms": "HS256", "secret": SECRET}, "non-empty list"),
        ({"algorithms": ["HS256"], "secret": SECRET, "leeway_seconds": -1}, "leeway_seconds"),
        ({"algorithms": ["HS256"], "secret": SECRET, "max_token_bytes": 0}, "max_token_bytes"),
        ({"algorithms": ["HS256"], "secret": SECRET, "verified_cache_size": -1}, "verified_cache_size"),
        ({"algorithms": ["HS256"], "secret": SECRET, "issuer": ""}, "issuer must be None"),
        ({"algorithms": ["HS256"], "secret": SECRET, "audience": " "}, "audience must be None"),
        ({"algorithms": ["HS256"], "secret": SECRET, "key_id": ""}, "key_id must be None"),
    ],
)
def test_constructor_refuses_bad_configuration(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        jose_verifier(**settings)


def test_constructor_refuses_a_pem_as_hmac_secret(keys: Keys) -> None:
    with pytest.raises(ValueError, match="looks like a PEM key"):
        jose_verifier(algorithms=["HS256"], secret=keys.public_pem)


def test_constructor_refuses_a_private_key_as_public_key(keys: Keys) -> None:
    with pytest.raises(ValueError, match="holds a private key"):
        jose_verifier(algorithms=["RS256"], public_key=keys.private_pem)


def test_short_secret_is_accepted_in_explicit_dev_mode() -> None:
    verifier = jose_verifier(algorithms=["HS256"], secret="dev", allow_short_secret=True, clock=FixedClock(NOW))

    assert verifier.verify(hs(claims(), secret="dev")).sub == "u1"


# --- minting ---------------------------------------------------------------------------------------


def test_minted_hs256_token_verifies_to_exact_claims() -> None:
    token = mint_token(
        key=SECRET,
        sub="u1",
        tenant_id="t1",
        role="user",
        email="u1@example.com",
        ttl_seconds=600,
        issuer=ISSUER,
        audience=AUDIENCE,
        extra={"department": "ops"},
        now=NOW,
        key_id=KID,
    )

    assert jws.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT", "kid": KID}
    assert make_verifier("hs", Keys("", "", "")).verify(token) == Claims(
        sub="u1",
        tenant_id="t1",
        exp=NOW + 600,
        iat=NOW,
        email="u1@example.com",
        role="user",
        extra={"department": "ops", "iss": ISSUER, "aud": AUDIENCE},
    )


def test_minted_rs256_token_verifies_to_exact_claims(keys: Keys) -> None:
    token = mint_token(
        key=keys.private_pem,
        algorithm="RS256",
        sub="svc",
        tenant_id="t1",
        issuer=ISSUER,
        audience=AUDIENCE,
        now=NOW,
    )

    assert make_verifier("rs", keys).verify(token) == Claims(
        sub="svc", tenant_id="t1", exp=NOW + 3600, iat=NOW, extra={"iss": ISSUER, "aud": AUDIENCE}
    )


def test_minted_token_verifies_against_the_system_clock() -> None:
    token = mint_token(key=SECRET, sub="u1", tenant_id="t1")

    verified = jose_verifier(algorithms=["HS256"], secret=SECRET).verify(token)

    assert verified.exp - 3600 == verified.iat


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"extra": {"tenant_id": "t2"}}, r"extra must not set \['tenant_id'\]"),
        ({"extra": {"exp": 1, "sub": "x"}}, r"extra must not set \['exp', 'sub'\]"),
        ({"algorithm": "none"}, "unsupported JWT algorithm 'none'"),
        ({"ttl_seconds": 0}, "ttl_seconds must be positive"),
        ({"sub": ""}, "sub and tenant_id must be non-empty"),
        ({"tenant_id": " "}, "sub and tenant_id must be non-empty"),
    ],
)
def test_mint_token_refuses(arguments: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {"key": SECRET, "sub": "u1", "tenant_id": "t1", **arguments}
    with pytest.raises(ValueError, match=message):
        mint_token(**settings)
