#!/usr/bin/env python3
"""An NTLM acceptor (the proxy's side) built on pyspnego's pure-Python NTLM, for
tests/ntlm_pyspnego.rs: an implementation independent of dialback checks dialback's NEGOTIATE
and AUTHENTICATE messages.

Credentials come from the file named by NTLM_USER_FILE, one `DOMAIN:USER:PASSWORD` a line
(empty DOMAIN for a domain-less user), as pyspnego reads it. Set LM_COMPAT_LEVEL=5 to make the
acceptor refuse anything but NTLMv2.

Line protocol on stdin/stdout (UTF-8, one message a line, base64 as in HTTP headers):

    script -> READY <pyspnego version> <context class>     once, at start
    client -> <NEGOTIATE_MESSAGE, base64>
    script -> CHALLENGE <CHALLENGE_MESSAGE, base64>        or: FAIL <reason>
    client -> <AUTHENTICATE_MESSAGE, base64>
    script -> OK <session key hex> <principal>             or: FAIL <reason>

after which the next NEGOTIATE starts a fresh exchange (new server challenge), until EOF.
Without pyspnego it prints `ERROR ...` naming the fix and exits with status 3.
"""

import base64
import binascii
import sys


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def one_line(text):
    return " ".join(str(text).split()) or "(no detail)"


def main():
    sys.stdout.reconfigure(encoding="utf-8")
    try:
        import spnego
        from spnego import NegotiateOptions
    except Exception as e:
        say(f"ERROR pyspnego is not importable ({one_line(e)}): run `python3 -m pip install pyspnego`")
        sys.exit(3)
    try:
        from importlib.metadata import version as dist_version

        version = dist_version("pyspnego")
    except Exception:
        version = "unknown"

    def new_server():
        # use_ntlm forces pyspnego's own Python NTLM (never gss-ntlmssp or SSPI).
        return spnego.server(protocol="ntlm", options=NegotiateOptions.use_ntlm)

    try:
        server = new_server()
    except Exception as e:
        say(f"ERROR cannot create the pyspnego NTLM acceptor: {one_line(e)}")
        sys.exit(3)
    say(f"READY {version} {type(server).__name__}")

    state = "negotiate"
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            token = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError) as e:
            say(f"FAIL bad base64: {one_line(e)}")
            server, state = new_server(), "negotiate"
            continue
        if state == "negotiate":
            try:
                challenge = server.step(token)
            except Exception as e:
                say(f"FAIL negotiate rejected: {e.__class__.__name__}: {one_line(e)}")
                server = new_server()
                continue
            if not challenge:
                say("FAIL no challenge produced")
                server = new_server()
                continue
            say("CHALLENGE " + base64.b64encode(challenge).decode("ascii"))
            state = "authenticate"
        else:
            try:
                out = server.step(token)
                if out:
                    raise RuntimeError("unexpected output token after AUTHENTICATE")
                if not server.complete:
                    raise RuntimeError("context not complete after AUTHENTICATE")
                say(f"OK {server.session_key.hex()} {server.client_principal}")
            except Exception as e:
                say(f"FAIL authenticate rejected: {e.__class__.__name__}: {one_line(e)}")
            server, state = new_server(), "negotiate"


if __name__ == "__main__":
    main()
