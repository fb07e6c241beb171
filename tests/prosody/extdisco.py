"""XEP-0215 client for tests/prosody.rs: logs in to prosody and asks for the
external services, the way a Jitsi Meet browser does after joining.

    extdisco.py HOST PORT DOMAIN [NAMESPACE]

Logs in anonymously (SASL ANONYMOUS, as Jitsi guests do) to DOMAIN at
HOST:PORT over plain TCP, sends <iq type='get' to=DOMAIN><services
xmlns='urn:xmpp:extdisco:2'/></iq> and prints the <service/> elements of the
answer as a JSON list of attribute maps. Exits non-zero on any error or after
20 s. Uses slixmpp (from PyPI, installed by ./test.sh into .venv).
"""

import asyncio
import json
import sys
import xml.etree.ElementTree as ET

import slixmpp

TIMEOUT = 20


async def query(host: str, port: int, domain: str, ns: str) -> list:
    # A bare domain JID and no password: slixmpp picks SASL ANONYMOUS.
    xmpp = slixmpp.ClientXMPP(domain, "")
    # The test's prosody listens on loopback without TLS (no certificate).
    xmpp.enable_plaintext = True
    xmpp.enable_starttls = False
    xmpp.enable_direct_tls = False
    failed = asyncio.get_running_loop().create_future()

    def fail(reason):
        if not failed.done():
            failed.set_result(reason)

    xmpp.add_event_handler("failed_auth", lambda _e: fail("authentication failed"))
    xmpp.add_event_handler("connection_failed", lambda e: fail(f"connection failed: {e}"))
    session = asyncio.ensure_future(xmpp.wait_until("session_start", timeout=TIMEOUT))
    xmpp.connect(host, port)
    done, _ = await asyncio.wait({session, failed}, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    if failed in done:
        raise RuntimeError(failed.result())
    if session not in done:
        raise TimeoutError("no XMPP session within %d s" % TIMEOUT)
    session.result()

    iq = xmpp.make_iq_get(ito=domain)
    iq.append(ET.Element("{%s}services" % ns))
    resp = await iq.send(timeout=TIMEOUT)
    services = resp.xml.find("{%s}services" % ns)
    if services is None:
        raise RuntimeError("no <services/> in the answer: %s" % ET.tostring(resp.xml, "unicode"))
    out = [dict(s.attrib) for s in services.findall("{%s}service" % ns)]
    xmpp.disconnect()
    return out


def main() -> int:
    host, port, domain = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ns = sys.argv[4] if len(sys.argv) > 4 else "urn:xmpp:extdisco:2"
    try:
        services = asyncio.run(asyncio.wait_for(query(host, port, domain, ns), TIMEOUT + 5))
    except Exception as e:  # noqa: BLE001 - report any failure to the test
        print("extdisco.py: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 1
    print(json.dumps(services))
    return 0


if __name__ == "__main__":
    sys.exit(main())
