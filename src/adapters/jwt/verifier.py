"""The `TokenVerifier` port on python-jose: bearer JWTs (HS* or RS*) with exact, stable error codes.

python-jose only checks the signature here. Everything it would be lenient or vague about is
checked by hand, before or after it: the size and shape of the token, the header's `alg` against
the pinned list (never the token's choice), the `kid`, and every claim (jose accepts `exp` as a
numeric string, ignores a missing `aud`, does not look at a future `iat`, and names no codes).

A token that passed all of that is remembered (bounded, least recently used first out), so a
client that sends the same token on every request pays for the parsing, the signature and the
claim checks once per token rather than once per request; its times are checked again on every
use.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, NoReturn

from jose import JOSEError, jwk, jws

from domain.model.errors import AuthError
from domain.model.identity import Claims
from domain.model.ports import Clock, TokenVerifier

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512"})
SUPPORTED_ALGORITHMS = HMAC_ALGORITHMS | RSA_ALGORITHMS

# Compact JWS: three base64url segments (no padding). The signature may be empty only so that an
# unsigned `alg: none` token is reported as the algorithm problem it is, not as mere garbage.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

_REQUIRED_CLAIMS = ("sub", "tenant_id", "exp")
# Claims that become fields of `Claims`; every other claim is kept in `Claims.extra`.
_MAPPED_CLAIMS = frozenset({"sub", "tenant_id", "exp", "iat", "email", "role"})


def _reject(code: str, message: str) -> NoReturn:
    # `from None`: the client-facing error must not carry library text that could quote the token.
    raise AuthError(code, message, status=401) from None


def _b64url_decode(segment: str) -> bytes:
    """Decode one unpadded base64url segment; the caller already limited it to the alphabet."""
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _is_number(value: object) -> bool:
    # bool is an int subclass, and Python's json accepts NaN and Infinity: neither is a NumericDate.
    # (math.isfinite is not asked about ints: a huge one would overflow the conversion to float.)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


class JoseTokenVerifier(TokenVerifier):
    """Verifies compact JWS bearer tokens against one pinned algorithm family and one key."""

    def __init__(
        self,
        *,
        algorithms: Sequence[str],
        secret: str | None = None,
        public_key: str | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_seconds: int,
        max_token_age_seconds: int,
        verified_cache_size: int,
        key_id: str | None = None,
        max_token_bytes: int = 8192,
        min_secret_bytes: int = 32,
        allow_short_secret: bool = False,
        clock: Clock,
    ) -> None:
        pinned = tuple(algorithms)
        if isinstance(algorithms, str) or not pinned:
            raise ValueError("algorithms must be a non-empty list of JWT algorithm names, e.g. ['HS256']")
        unknown = [name for name in pinned if name not in SUPPORTED_ALGORITHMS]
        if unknown:
            supported = sorted(SUPPORTED_ALGORITHMS)
            raise ValueError(f"unsupported JWT algorithm(s) {unknown}; supported: {supported}")
        uses_hmac = any(name in HMAC_ALGORITHMS for name in pinned)
        uses_rsa = any(name in RSA_ALGORITHMS for name in pinned)
        if uses_hmac and uses_rsa:
            # One verifier accepting both families invites key confusion (HS signed with the RSA key).
            raise ValueError("algorithms must not mix HS* and RS* families; pin one family")
        if leeway_seconds < 0:
            raise ValueError("leeway_seconds must not be negative")
        if max_token_age_seconds <= 0:
            raise ValueError("max_token_age_seconds must be positive")
        if max_token_bytes <= 0:
            raise ValueError("max_token_bytes must be positive")
        if verified_cache_size < 0:
            raise ValueError("verified_cache_size must not be negative (0 turns the cache off)")
        for setting, value in (("issuer", issuer), ("audience", audience), ("key_id", key_id)):
            if value is not None and not value.strip():
                raise ValueError(f"{setting} must be None (not checked) or a non-empty string")

        if uses_hmac:
            keys = self._hmac_keys(pinned, secret, min_secret_bytes, allow_short_secret)
        else:
            keys = self._rsa_keys(pinned, public_key)

        self._algorithms = frozenset(pinned)
        # One prepared key per algorithm, so the key used is always bound to a pinned algorithm.
        self._keys: Mapping[str, Any] = keys
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        self._max_age = max_token_age_seconds
        self._key_id = key_id
        self._max_token_bytes = max_token_bytes
        self._clock = clock
        # Verified tokens by the SHA-256 of their exact text: a token differing in any byte (another
        # signature) is another key, only a token that passed every check is stored, and the cache
        # holds no usable bearer token. The keys above are fixed for this verifier's lifetime, so
        # the cache never outlives them: a new key means a new verifier with an empty cache.
        self._verified: OrderedDict[bytes, _Verified] = OrderedDict()
        self._verified_cache_size = verified_cache_size

    @staticmethod
    def _hmac_keys(
        algorithms: Sequence[str], secret: str | None, min_secret_bytes: int, allow_short_secret: bool
    ) -> dict[str, Any]:
        if not secret:
            raise ValueError("HS* algorithms need a secret")
        if len(secret.encode("utf-8")) < min_secret_bytes and not allow_short_secret:
            raise ValueError(
                f"the HS* secret must be at least {min_secret_bytes} bytes "
                "(a shorter one is allowed only in an explicit dev mode)"
            )
        try:
            return {name: jwk.construct(secret, name) for name in algorithms}
        except JOSEError:
            raise ValueError("the HS* secret looks like a PEM key, not an HMAC secret") from None

    @staticmethod
    def _rsa_keys(algorithms: Sequence[str], public_key: str | None) -> dict[str, Any]:
        if not public_key:
            raise ValueError("RS* algorithms need a public key (PEM)")
        try:
            keys = {name: jwk.construct(public_key, name) for name in algorithms}
        except JOSEError:
            raise ValueError("public_key is not a valid RSA public key in PEM format") from None
        if not all(key.is_public() for key in keys.values()):
            # A verifier needs only the public half; a private key here means it is spread too far.
            raise ValueError("public_key holds a private key; configure the public key only")
        return keys

    def verify(self, token: str) -> Claims:
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest() if isinstance(token, str) else b""
        known = self._verified.get(digest)
        if known is not None:
            try:
                # Only time moves: the signature, algorithm, key id, issuer and audience were checked.
                self._check_times(known.exp, known.iat, known.nbf)
            except AuthError:
                del self._verified[digest]
                raise
            self._verified.move_to_end(digest)
            return known.claims
        header = self._parse_header(token)
        algorithm = self._pinned_algorithm(header)
        self._check_key_id(header)
        try:
            payload_bytes: bytes = jws.verify(token, self._keys[algorithm], algorithms=[algorithm])
        except JOSEError:
            _reject("invalid_signature", "The token's signature is not valid.")
        verified = self._claims(self._decode_payload(payload_bytes))
        if self._verified_cache_size:
            self._verified[digest] = verified
            if len(self._verified) > self._verified_cache_size:
                self._verified.popitem(last=False)
        return verified.claims

    @property
    def cached_tokens(self) -> int:
        """How many verified tokens are remembered now."""
        return len(self._verified)

    def _parse_header(self, token: str) -> dict[str, Any]:
        """Shape checks before any cryptography: size, three segments, a JSON object header."""
        if not isinstance(token, str) or not token:
            _reject("malformed_token", "The bearer token is empty.")
        # The pattern admits ASCII only, so characters equal bytes once it matched.
        if len(token) > self._max_token_bytes:
            _reject("malformed_token", "The bearer token is too large.")
        if not _COMPACT_JWS.fullmatch(token):
            _reject("malformed_token", "The bearer token is not a compact JWT.")
        header_segment, payload_segment, signature_segment = token.split(".")
        try:
            header = json.loads(_b64url_decode(header_segment))
            _b64url_decode(payload_segment)
            _b64url_decode(signature_segment)
        # ValueError covers bad base64 (binascii.Error), bad UTF-8 and bad JSON; RecursionError
        # comes from absurdly nested JSON.
        except (ValueError, RecursionError):
            _reject("malformed_token", "The bearer token is not a compact JWT.")
        if not isinstance(header, dict):
            _reject("malformed_token", "The token header is not a JSON object.")
        if "crit" in header:
            # RFC 7515 4.1.11: critical extensions we do not implement (e.g. b64=false) must fail.
            _reject("malformed_token", "The token header declares unsupported critical extensions.")
        return header

    def _pinned_algorithm(self, header: Mapping[str, Any]) -> str:
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            _reject("unsupported_algorithm", "The token's algorithm is not accepted.")
        return algorithm

    def _check_key_id(self, header: Mapping[str, Any]) -> None:
        # A token without `kid` is fine: there is one configured key. A different `kid` means the
        # token was signed with a key this service does not hold (or was rotated away).
        if self._key_id is not None and "kid" in header and header["kid"] != self._key_id:
            _reject("unknown_key", "The token's key id is not known.")

    @staticmethod
    def _decode_payload(payload_bytes: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(payload_bytes)
        except (ValueError, RecursionError):  # ValueError includes UnicodeDecodeError
            _reject("malformed_token", "The token payload is not JSON.")
        if not isinstance(payload, dict):
            _reject("malformed_token", "The token payload is not a JSON object.")
        return payload

    def _claims(self, payload: dict[str, Any]) -> _Verified:
        for name in _REQUIRED_CLAIMS:
            if name not in payload:
                _reject("missing_claim", f"The token has no '{name}' claim.")
        sub = _non_empty_string(payload, "sub")
        tenant_id = _non_empty_string(payload, "tenant_id")
        exp = _numeric_date(payload, "exp")
        iat = _optional_numeric_date(payload, "iat")
        nbf = _optional_numeric_date(payload, "nbf")
        email = _optional_string(payload, "email")
        role = _optional_string(payload, "role")

        self._check_times(exp, iat, nbf)
        if self._issuer is not None:
            self._check_issuer(payload)
        if self._audience is not None:
            self._check_audience(payload)

        claims = Claims(
            sub=sub,
            tenant_id=tenant_id,
            exp=int(exp),
            iat=None if iat is None else int(iat),
            email=email,
            role=role,
            extra=MappingProxyType({k: v for k, v in payload.items() if k not in _MAPPED_CLAIMS}),
        )
        return _Verified(claims, exp, iat, nbf)

    def _check_times(self, exp: int | float, iat: int | float | None, nbf: int | float | None) -> None:
        now = self._clock.now()
        # RFC 7519: reject "on or after" exp and before nbf; the leeway absorbs clock skew.
        if now >= exp + self._leeway:
            _reject("token_expired", "The token has expired.")
        if nbf is not None and now + self._leeway < nbf:
            _reject("token_not_yet_valid", "The token is not valid yet.")
        if iat is not None and now + self._leeway < iat:
            _reject("token_not_yet_valid", "The token was issued in the future.")
        # A token valid for years (exp 10^30) is as good as a password that never changes: its
        # lifetime, and what is left of it, must stay within the configured maximum.
        if (iat is not None and exp - iat > self._max_age) or exp - now > self._max_age + self._leeway:
            _reject("token_lifetime_too_long", f"The token is valid for longer than the maximum of {self._max_age} s.")

    def _check_issuer(self, payload: Mapping[str, Any]) -> None:
        issuer = payload.get("iss")
        if "iss" in payload and not isinstance(issuer, str):
            _reject("invalid_claim", "Claim 'iss' must be a string.")
        if issuer != self._issuer:
            _reject("invalid_issuer", "The token's issuer is not accepted.")

    def _check_audience(self, payload: Mapping[str, Any]) -> None:
        # Unlike python-jose, a missing `aud` fails once an audience is configured.
        audience = payload.get("aud")
        if isinstance(audience, str):
            audiences = [audience]
        elif isinstance(audience, list) and all(isinstance(item, str) for item in audience):
            audiences = audience
        elif "aud" in payload:
            _reject("invalid_claim", "Claim 'aud' must be a string or a list of strings.")
        else:
            audiences = []
        if self._audience not in audiences:
            _reject("invalid_audience", "The token is not meant for this service.")


class _Verified(NamedTuple):
    """A verified token's claims, and its times as sent (unrounded), to check again on each use."""

    claims: Claims
    exp: int | float
    iat: int | float | None
    nbf: int | float | None


def _non_empty_string(payload: Mapping[str, Any], name: str) -> str:
    value = payload[name]
    if not isinstance(value, str) or not value.strip():
        _reject("invalid_claim", f"Claim '{name}' must be a non-empty string.")
    return value


def _optional_string(payload: Mapping[str, Any], name: str) -> str | None:
    if name not in payload:
        return None
    value = payload[name]
    if not isinstance(value, str):
        _reject("invalid_claim", f"Claim '{name}' must be a string.")
    return value


def _numeric_date(payload: Mapping[str, Any], name: str) -> int | float:
    value = payload[name]
    if not _is_number(value):
        _reject("invalid_claim", f"Claim '{name}' must be a number of seconds since the epoch.")
    checked: int | float = value  # an int or a finite float: never converted, a huge int would overflow
    return checked


def _optional_numeric_date(payload: Mapping[str, Any], name: str) -> int | float | None:
    return _numeric_date(payload, name) if name in payload else None
