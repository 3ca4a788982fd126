"""What a failed connection most likely means, in the one line a user reads, and whether
trying again can help.

gRPC reports every dialing mistake as UNAVAILABLE with a detail string from deep inside
its transport; this turns the ones people make (a closed port, a combiner's port, the
tracking port, an HTTP server, TLS on one side only, an untrusted certificate) into the
likely cause and the option to change. Pure: strings in, a ``Diagnosis`` out.
"""

from __future__ import annotations

from dataclasses import dataclass

SPEAKS_PLAINTEXT = "TLS handshake failed: the server speaks plaintext"
UNTRUSTED = "TLS: the server's certificate is not trusted"

# What a diagnosis tells the connection loop to do.
RETRY = "retry"  # transient: say so, back off, try again
MISTAKE = "mistake"  # a setting that retrying will not fix: give up after a few in a row
WRONG_SERVICE = "wrong_service"  # not a fedray gateway at all: give up at once
DOWN = "down"  # nothing listens (yet): say it once, then wait quietly


@dataclass(frozen=True)
class Diagnosis:
    why: str
    action: str = RETRY


def diagnose(code: str, details: str, target: str, tls: bool, client_cert: bool) -> Diagnosis:
    """The likely cause of a failed call to ``target`` (``code``: the status name)."""
    if code == "UNIMPLEMENTED":
        return Diagnosis(f"{target} is a fedray server but not a gateway (a combiner's "
                         "port?): --gateway takes the federation's controller.port",
                         WRONG_SERVICE)
    if "CERTIFICATE_VERIFY_FAILED" in details or "Hostname Verification" in details:
        return Diagnosis(f"{UNTRUSTED}; check --ca / --tls-server-name", MISTAKE)
    if "WRONG_VERSION_NUMBER" in details:
        return Diagnosis(f"{SPEAKS_PLAINTEXT}; drop --ca / --tls", MISTAKE)
    if "handshake" in details.lower():
        return Diagnosis("TLS handshake failed: the server does not speak TLS as a fedray "
                         "gateway does (the tracking port? --gateway takes controller.port)",
                         MISTAKE)
    if "Failed parsing HTTP/2" in details or "HTTP/1" in details:
        return Diagnosis(f"{target} is an HTTP/1 server, not a fedray gateway (Ray's "
                         "dashboard?): --gateway takes the federation's controller.port",
                         WRONG_SERVICE)
    if "Connection refused" in details:
        return Diagnosis(f"nothing listens at {target}: the federation is not running (yet), "
                         "or --gateway is not its controller.port", DOWN)
    if "DNS resolution failed" in details or "Name or service not known" in details:
        return Diagnosis(f"cannot resolve the host of {target}; check --gateway", MISTAKE)
    why = details.rsplit(": ", 1)[-1]
    if why == "Socket closed" and not tls:
        return Diagnosis(f"{why}: the server closed a plaintext connection: the federation "
                         "serves TLS (pass --credentials or --ca), or this is not its gateway "
                         "(the tracking port? --gateway takes controller.port)", MISTAKE)
    if why == "Socket closed" and not client_cert:
        return Diagnosis(f"{why}; if the federation asks for client certificates, pass "
                         "--cert/--key", MISTAKE)
    return Diagnosis(why)
