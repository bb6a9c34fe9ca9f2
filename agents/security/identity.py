"""Who a sender is, as far as the pipeline can verify: identities granted by an admin.

An `AgentIdentity` (compacted `security.identities`, admin-signed) grants an agent its
roles, the security levels it may send at, the HMAC key ids that may sign for it, the AES
key ids it may encrypt with and the user whose access token authenticates it. Policies
select and check on the **granted** roles of the **verified** sender:

* a message whose proof verifies (a signature by a key granted to the sender, or the
  access token of the sender's token user) comes from a *verified* sender;
* everything else comes from an *unverified* sender, whose only role is ``anonymous``;
* a message may claim one role (`sender_role`); the claim narrows the roles used to that
  one, and is denied (rule ``role_not_granted``) when the sender is not granted it;
  no claim = every granted role (``anonymous`` when none is granted).

Roles and levels are compared after `norm_name` (NFKC, case folded, white space
collapsed), so ``"Intern "`` is ``intern``. The unsafe `trust_claimed_roles` config keeps
the old behaviour (the claim is the role) for migrating producers.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from agentstream.schemas.security import AgentIdentity


@lru_cache(maxsize=4096)  # roles and levels are few; every message names one of each
def norm_name(value: str) -> str:
    """A role or level as compared: NFKC, case folded, inner white space collapsed."""
    return " ".join(unicodedata.normalize("NFKC", value).casefold().split())


def norm_names(values: Iterable[str]) -> frozenset[str]:
    return frozenset(n for n in (norm_name(v) for v in values) if n)


@dataclass(frozen=True)
class Identity:
    """One agent's grants, normalised."""

    agent_id: str
    version: int
    roles: frozenset[str]
    #: empty = every known level
    levels: frozenset[str]
    #: the keychain ids that may sign for the agent (never empty: default its own id)
    signing_key_ids: frozenset[str]
    encryption_key_ids: frozenset[str]
    token_user_id: int | None
    #: the admin key that signed the grant
    signed_by: str = ""

    @classmethod
    def of(cls, grant: AgentIdentity) -> Identity:
        return cls(
            agent_id=grant.agent_id,
            version=grant.version,
            roles=norm_names(grant.roles),
            levels=norm_names(grant.levels),
            signing_key_ids=frozenset(grant.signing_key_ids or [grant.agent_id]),
            encryption_key_ids=frozenset(grant.encryption_key_ids),
            token_user_id=grant.token_user_id,
            signed_by=grant.signed_by,
        )


class IdentityRegistry:
    """The identities in force: an immutable snapshot (a change builds a new one)."""

    def __init__(
        self, identities: Iterable[Identity] = (), *, invalid: Mapping[str, str] | None = None
    ) -> None:
        self._by_id = {i.agent_id: i for i in identities}
        #: stored records that are not valid identities: {agent id: problem}
        self.invalid = dict(invalid or {})

    def get(self, agent_id: str) -> Identity | None:
        return self._by_id.get(agent_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Any:
        return iter(self._by_id.values())

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> IdentityRegistry:
        """From the folded `security.identities` state: {agent_id: AgentIdentity JSON}."""
        found: list[Identity] = []
        invalid: dict[str, str] = {}
        for key, raw in state.items():
            try:
                found.append(Identity.of(AgentIdentity.model_validate(raw)))
            except ValidationError as exc:
                invalid[key] = str(exc).splitlines()[0]
        return cls(found, invalid=invalid)


EMPTY = IdentityRegistry()
