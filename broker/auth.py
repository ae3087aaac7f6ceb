"""Who a client is and what it may do: JWTs checked at the handshake and in `auth` messages,
a denylist of revoked token ids, and the topic grants a token carries.

Authentication is on when a key is configured (`auth_jwt_secret` or `auth_jwt_secret_file`,
`auth_jwt_public_key_file` or `auth_jwks_file`). Each algorithm is bound to its kind of key: HS256 only ever uses the
secret, RS256 and ES256 only public keys of their type, so a token cannot choose how it is
checked (no `none`, no HS256 signed with a public key). Without a key every client is let in
with no restriction (the embedded default).
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .config import Config, read_secret
from .errors import BrokerError, ConfigError
from .grants import NOTHING, ClaimError, Grants, rights_of, split_patterns
from .revocation import Denylist, RuleError

ALGORITHMS = ("HS256", "RS256", "ES256")
SUBPROTOCOL_PREFIX = "bearer."
MIN_SECRET_BYTES = 32  # an HS256 key at least as long as the hash (RFC 7518 3.2)


class AuthError(BrokerError):
    """A token (or its absence) refused: the HTTP status at the handshake and a reason that
    names the rule, never the token."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class Identity:
    """A connection's user (None: anonymous or no authentication), its token's id, expiry
    (unix time, leeway included; None: no token) and issue time (`iat`; None: none given),
    and its grants (None: no restriction)."""

    __slots__ = ("user", "jti", "expires", "grants", "issued")

    def __init__(
        self,
        user: str | None = None,
        jti: str | None = None,
        expires: float | None = None,
        grants: Grants | None = None,
        issued: float | None = None,
    ) -> None:
        self.user = user
        self.jti = jti
        self.expires = expires
        self.grants = grants
        self.issued = issued


UNRESTRICTED = Identity()


class _Watched:
    """A file read again when its modification time or size changes."""

    __slots__ = ("path", "stamp")

    def __init__(self, path: str) -> None:
        self.path = path
        self.stamp: tuple[int, int] | None = None

    def changed(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        return True


class Authenticator:
    """Checks tokens with the configured keys; reads the JWKS and denylist files again when
    they change (`refresh`, called by the server about once a second and on SIGHUP)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        secret = read_secret(config, "auth_jwt_secret").encode()
        if secret and len(secret) < MIN_SECRET_BYTES:
            setting = "auth_jwt_secret_file" if config.auth_jwt_secret_file else "auth_jwt_secret"
            raise ConfigError(
                f"invalid setting: {setting}: an HS256 secret must be at least {MIN_SECRET_BYTES} bytes (RFC 7518 3.2: "
                f"as long as the SHA-256 output), not {len(secret)}; make one with `openssl rand -base64 48`"
            )
        self.secret = secret or None
        self.public_key = None
        self.public_algorithm = ""
        if config.auth_jwt_public_key_file:
            self.public_key, self.public_algorithm = _read_public_key(config.auth_jwt_public_key_file)
        self._jwks = _Watched(config.auth_jwks_file) if config.auth_jwks_file else None
        self.jwks: dict[str | None, list[jwt.PyJWK]] = {}
        if self._jwks is not None:
            self._jwks.changed()
            self.jwks = _read_jwks(config.auth_jwks_file)
        self.enabled = bool(self.secret or self.public_key or self._jwks)
        self.checks = 0  # tokens checked (at handshakes and in `auth` messages)
        self.sources = config.token_sources
        try:
            anonymous = Grants(
                split_patterns(config.auth_anonymous_subscribe),
                split_patterns(config.auth_anonymous_publish),
                respond=None if config.auth_respond_follows_subscribe else NOTHING,
            )
        except Exception as exc:
            raise ConfigError(f"invalid setting: auth_anonymous_subscribe/auth_anonymous_publish: {exc}") from None
        self.anonymous = Identity(grants=anonymous) if config.auth_anonymous else None
        self._denylist = _Watched(config.auth_denylist_file) if config.auth_denylist_file else None
        self.listed = Denylist()  # the rules of the denylist file
        self.added = Denylist()  # rules added by the admin API and not written to a file
        self.rules = Denylist()  # both: the rules in force
        if self._denylist is not None:
            if not os.path.exists(config.auth_denylist_file):
                raise ConfigError(f"invalid setting: auth_denylist_file: {config.auth_denylist_file} does not exist")
            try:
                self.refresh()
            except RuleError as exc:
                raise ConfigError(f"invalid setting: auth_denylist_file: {exc}") from None
        if (config.auth_anonymous or config.auth_denylist_file) and not self.enabled:
            raise ConfigError(
                "invalid setting: auth_anonymous and auth_denylist_file need a key (auth_jwt_secret, auth_jwt_secret_file, auth_jwt_public_key_file or auth_jwks_file)"
            )

    def key_settings(self) -> list[str]:
        """The settings that gave the keys tokens are checked with (none: authentication is off)."""
        given = [("auth_jwt_secret", self.secret), ("auth_jwt_public_key_file", self.public_key), ("auth_jwks_file", self._jwks)]
        return [name for name, value in given if value is not None]

    # files

    def refresh(self, force: bool = False) -> bool:
        """Read the JWKS and the denylist again if they changed (`force`: in any case); True
        when the denylist was read. A file that cannot be read, or holds a line that is no
        rule, keeps what was read before (the caller logs why)."""
        if force:
            for watched in (self._jwks, self._denylist):
                if watched is not None:
                    watched.stamp = None
        if self._jwks is not None and self._jwks.changed():
            self.jwks = _read_jwks(self.config.auth_jwks_file)
        if self._denylist is not None and self._denylist.changed():
            with open(self._denylist.path, encoding="utf-8") as fh:
                self.listed = Denylist.parse(fh)
            self.rules = self.listed.merge(self.added)
            return True
        return False

    def revoke(self, line: str) -> str | None:
        """Put a rule (a denylist line, see broker.revocation) in force at once. With a denylist
        file it is appended there (so it lasts and reaches every process reading the file),
        and the path is returned; without one it is held in memory, by this process, until it
        stops (None). Raises OSError when the file cannot be written: the rule is then held in
        memory all the same."""
        path = self._denylist.path if self._denylist is not None else None
        if path is not None:
            try:
                with open(path, "a+b") as fh:
                    fh.seek(0)
                    text = fh.read()
                    # another process of the group (a worker) may have written it already
                    if line.encode() not in (part.strip() for part in text.split(b"\n")):
                        fh.write((b"" if not text or text.endswith(b"\n") else b"\n") + line.encode() + b"\n")
                self.listed.add(line)
                self.rules = self.listed.merge(self.added)
                return path
            except OSError:
                self.added.add(line)
                self.rules = self.listed.merge(self.added)
                raise
        self.added.add(line)
        self.rules = self.listed.merge(self.added)
        return None

    def revoked(self, identity: Identity) -> bool:
        """Whether a rule revokes the connection's token (never an anonymous one: no token)."""
        if identity.expires is None:
            return False
        return self.rules.revoked(identity.jti, identity.user, identity.issued)

    # tokens

    def token_of(self, path: str, authorization: str | None, protocols: list[str]) -> str | None:
        """The token of an upgrade request, from the configured sources in their order."""
        for source in self.sources:
            if source == "header" and authorization is not None:
                scheme, _, token = authorization.strip().partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    raise AuthError(401, "the Authorization header must be 'Bearer <token>'")
                return token.strip()
            if source == "subprotocol":
                for entry in protocols:
                    if entry[: len(SUBPROTOCOL_PREFIX)].lower() == SUBPROTOCOL_PREFIX:  # any case, as HTTP's Bearer
                        return entry[len(SUBPROTOCOL_PREFIX) :]
            if source == "query":
                query = path.partition("?")[2]
                values = parse_qs(query, keep_blank_values=True).get(self.config.auth_query_param)
                if values:
                    return values[0]
        return None

    def identify(self, path: str, authorization: str | None, protocols: list[str]) -> Identity:
        """The identity of an upgrade request (raises AuthError: 401 no or bad token, 403
        revoked)."""
        if not self.enabled:
            return UNRESTRICTED
        token = self.token_of(path, authorization, protocols)
        if token is None:
            if self.anonymous is not None:
                return self.anonymous
            where = {
                "header": "an Authorization: Bearer header",
                "subprotocol": f"a Sec-WebSocket-Protocol entry {SUBPROTOCOL_PREFIX}<token>",
                "query": f"the query parameter {self.config.auth_query_param}",
            }
            raise AuthError(401, "a token is required: send it in " + " or ".join(where[s] for s in self.sources))
        return self.verify(token)

    def verify(self, token: str) -> Identity:
        """Check a token: signature, algorithm, exp (required), nbf, iat, aud, iss, the
        denylist and the grant claims."""
        cfg = self.config
        self.checks += 1
        if len(token) > cfg.auth_max_token_bytes:
            raise AuthError(401, f"token longer than {cfg.auth_max_token_bytes} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, TypeError, ValueError):
            raise AuthError(401, "malformed token") from None
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise AuthError(401, f"token algorithm {str(algorithm)[:16]!r} is not accepted")
        key = self._key(algorithm, header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=cfg.auth_audience or None,
                issuer=cfg.auth_issuer or None,
                leeway=cfg.auth_leeway_s,
                options={"require": ["exp"], "verify_aud": bool(cfg.auth_audience)},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None
        except jwt.ImmatureSignatureError as exc:  # an iat that is not a number is an invalid token, below
            raise AuthError(401, "token issued in the future (iat)" if "iat" in str(exc) else "token not yet valid (nbf)") from None
        except jwt.InvalidAudienceError:
            raise AuthError(401, "token audience does not match") from None
        except jwt.InvalidIssuerError:
            raise AuthError(401, "token issuer does not match") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(401, f"token lacks the {exc.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError(401, "bad token signature") from None
        except (jwt.PyJWTError, TypeError, ValueError):  # anything else a token can provoke
            raise AuthError(401, "invalid token") from None
        jti = claims.get("jti")
        jti = str(jti) if jti is not None else None
        user = claims.get(cfg.auth_user_claim)
        user = str(user)[:256] if user is not None else None
        iat = claims.get("iat")
        issued = float(iat) if type(iat) is int or type(iat) is float else None
        if self.rules and self.rules.revoked(jti, user, issued):
            raise AuthError(403, "token revoked")
        try:
            respond = rights_of(claims.get(cfg.auth_respond_claim), cfg.auth_respond_claim)
            grants = Grants(
                rights_of(claims.get(cfg.auth_subscribe_claim), cfg.auth_subscribe_claim) or NOTHING,
                rights_of(claims.get(cfg.auth_publish_claim), cfg.auth_publish_claim) or NOTHING,
                rights_of(claims.get(cfg.auth_history_claim), cfg.auth_history_claim),  # absent: as subscribe
                respond if respond is not None or cfg.auth_respond_follows_subscribe else NOTHING,
            )
        except ClaimError as exc:
            raise AuthError(401, str(exc)) from None
        return Identity(user, jti, float(claims["exp"]) + cfg.auth_leeway_s, grants, issued)

    def _key(self, algorithm: str, kid: object) -> Any:
        if self.jwks:
            found = self.jwks.get(kid if isinstance(kid, str) else None) or (self.jwks.get(None) if kid is None else None)
            if found:
                for candidate in found:
                    if candidate.algorithm_name == algorithm:
                        return candidate.key
        if algorithm == "HS256":
            if self.secret is not None:
                return self.secret
        elif self.public_key is not None and algorithm == self.public_algorithm:
            return self.public_key
        raise AuthError(401, f"no key accepts {algorithm} tokens" + (f" with kid {str(kid)[:64]!r}" if kid is not None else ""))


def _read_public_key(path: str) -> tuple[Any, str]:
    try:
        with open(path, "rb") as fh:
            key = load_pem_public_key(fh.read())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"invalid setting: auth_jwt_public_key_file: cannot read a PEM public key from {path}: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise ConfigError("invalid setting: auth_jwt_public_key_file: the key must be RSA (RS256) or EC P-256 (ES256)")


def _read_jwks(path: str) -> dict[str | None, list[jwt.PyJWK]]:
    """The keys of a JWKS file by kid (keys without a kid under None); only keys whose
    algorithm is one of ALGORITHMS."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        keys = data["keys"]
        if not isinstance(keys, list):
            raise ValueError("keys is not a list")
        out: dict[str | None, list[jwt.PyJWK]] = {}
        for entry in keys:
            key = jwt.PyJWK(entry, entry.get("alg") or _default_algorithm(entry))
            if key.algorithm_name == "HS256" and len(key.key) < MIN_SECRET_BYTES:
                raise ValueError(
                    f"the HS256 key {entry.get('kid')!r} has {len(key.key)} bytes; it must have at least {MIN_SECRET_BYTES} (RFC 7518 3.2)"
                )
            if key.algorithm_name in ALGORITHMS:
                out.setdefault(entry.get("kid"), []).append(key)
    except (OSError, ValueError, KeyError, TypeError, jwt.PyJWKError, jwt.InvalidKeyError) as exc:
        raise ConfigError(f"invalid setting: auth_jwks_file: cannot read a JWKS from {path}: {exc}") from None
    return out


def _default_algorithm(entry: dict) -> str | None:
    kty = entry.get("kty")
    if kty == "RSA":
        return "RS256"
    if kty == "EC" and entry.get("crv") == "P-256":
        return "ES256"
    if kty == "oct":
        return "HS256"
    return None
