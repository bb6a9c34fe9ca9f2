"""The worker image's ``HEALTHCHECK``: ``GET /health`` on this container's web port.

    python -m agentstream.infra.compose.healthcheck     # exit 0: alive; 1: not (one line says why)

A module rather than ``curl`` (slim images have none) or a ``python -c`` one-liner,
because three things need handling that a one-liner gets wrong:

* **Proxies**: a worker that reaches its LLM providers through ``HTTP(S)_PROXY`` would
  send the probe of 127.0.0.1 to the proxy too (urllib honours those variables); the
  probe uses no proxy.
* **HTTPS**: with ``AGENTSTREAM_WEB_TLS_CERTFILE`` set the views speak TLS only. Their
  certificate names the advertised host, not 127.0.0.1, so the probe does not verify it:
  it sends nothing secret (``/health`` needs no token) and only asks whether this
  process answers.
* **A timeout** shorter than Docker's (``--timeout``), so a hung worker is reported as
  such instead of the probe being killed without a word.

Only the standard library, and no settings object: the probe runs every few seconds.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

DEFAULT_PORT = 6066
TIMEOUT_S = 4.0


def health_url(environ: Mapping[str, str]) -> str:
    scheme = "https" if environ.get("AGENTSTREAM_WEB_TLS_CERTFILE") else "http"
    port = int(environ.get("AGENTSTREAM_WEB_PORT") or DEFAULT_PORT)
    return f"{scheme}://127.0.0.1:{port}/health"


def probe(url: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """None when `url` answers 200 with ``{"status": "alive"}``, else why not."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # loopback liveness only: see the module doc
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(url, timeout=timeout_s) as response:
            body = json.loads(response.read(65536))
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except (OSError, ValueError) as exc:  # refused, timed out, TLS, not JSON
        return f"{url}: {type(exc).__name__}: {exc}"
    if not isinstance(body, dict) or body.get("status") != "alive":
        return f"{url}: unexpected answer {str(body)[:200]}"
    return None


def main() -> int:
    url = health_url(os.environ)
    problem = probe(url)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    print(f"{url}: alive")
    return 0


if __name__ == "__main__":
    sys.exit(main())
