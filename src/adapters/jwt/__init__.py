"""JWT bearer tokens on python-jose: the `TokenVerifier` adapter and token minting."""

from adapters.jwt.minting import mint_token
from adapters.jwt.verifier import JoseTokenVerifier

__all__ = ["JoseTokenVerifier", "mint_token"]
