"""The security side of `agentstream demo`: what an operator and the agents would set up.

- a throwaway keychain (the encrypted-file backend, in the demo's directory, with a fresh
  master password per run) holding a fresh admin key and each agent's signing key;
- the worker trusts that admin key (`AGENTSTREAM_SECURITY_ADMIN_KEYS`);
- admin-signed policies, config and identities: even-numbered agents are planners, the
  others workers; the last agent has no signing key at all (an unverified sender);
- every message of an agent that holds a key is HMAC-signed with an issue time.

So the demo's traffic shows the rules as a deployment sees them: confidential messages
claiming `planner` are accepted from planners and denied (`role_not_granted`) from
workers and from the unverified agent, credentials and oversized content are denied by
policy, everything else is accepted.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from agentstream.agents.security.crypto import new_key, sign_message
from agentstream.schemas import AgentMessage
from agentstream.schemas.security import AgentIdentity, SecurityConfig, SecurityPolicy, SignedChange
from agentstream.streams import signing
from agentstream.streams.cli.demo import register_demo_security
from agentstream.streams.client import AsyncClient
from agentstream.streams.credentials import KeychainCredentialsProvider
from agentstream.streams.settings import Settings
from agentstream.streams.topics import SECURITY_IDENTITIES, SECURITY_POLICIES

ADMIN_KEY_ID = "demo-admin"

POLICIES = [
    SecurityPolicy(
        policy_id="no-secrets",
        description="Never pass credentials around",
        level="standard",
        blocked_patterns=[r"(?i)password\s*[:=]\s*\S+", r"sk-[A-Za-z0-9]{20,}"],
        max_message_size=2048,
    ),
    SecurityPolicy(
        policy_id="confidential-roles",
        level="confidential",
        allowed_roles=["planner", "auditor"],
        max_message_size=4096,
    ),
]


class DemoSecurity:
    def __init__(self, directory: Path, agents: list[str]) -> None:
        keyring = directory / "keyring.json"
        keyring.unlink(missing_ok=True)  # a fresh keychain per run
        self.admin = signing.new_private_key()
        self.env = {
            "AGENTSTREAM_KEYRING_BACKEND": "encrypted-file",
            "AGENTSTREAM_KEYRING_FILE": str(keyring),
            "AGENTSTREAM_KEYRING_PASSWORD": secrets.token_urlsafe(16),
            "AGENTSTREAM_SECURITY_ADMIN_KEYS": f"{ADMIN_KEY_ID}={signing.public_b64(self.admin)}",
            "AGENTSTREAM_SECURITY_ADMIN_KEY_ID": ADMIN_KEY_ID,
        }
        #: the last agent holds no key: it is never verified
        self.keys = {agent: new_key() for agent in agents[:-1]} if len(agents) > 1 else {}
        self.agents = agents

    async def store_keys(self) -> None:
        provider = KeychainCredentialsProvider(Settings.from_env(self.env))
        for agent, key in self.keys.items():
            await provider.set_signing_key(agent, key)

    def _signed(self, payload: SignedChange) -> Any:
        body = signing.sign_change(
            payload.TYPE, payload.model_dump(mode="json"), self.admin, ADMIN_KEY_ID
        )
        return type(payload).model_validate(body)

    async def publish_rules(self, client: AsyncClient) -> None:
        for policy in POLICIES:
            await client.publish(SECURITY_POLICIES, self._signed(policy))
        config = SecurityConfig(enabled=True, default_action="allow")
        await client.publish(SECURITY_POLICIES, self._signed(config))
        for i, agent in enumerate(self.agents):
            if agent in self.keys:
                role = "planner" if i % 2 == 0 else "worker"
                grant = AgentIdentity(agent_id=agent, roles=[role])
                await client.publish(SECURITY_IDENTITIES, self._signed(grant))

    def sign(self, message: AgentMessage) -> AgentMessage:
        key = self.keys.get(message.sender_id)
        return message if key is None else sign_message(message, key)


async def _setup(directory: Path, agents: list[str]) -> DemoSecurity:
    security = DemoSecurity(directory, agents)
    await security.store_keys()
    return security


register_demo_security(_setup)
