"""Drives oras-py (PyPI's `oras`, the ORAS Python SDK) against a registry for Berth's tests.

    python oras_driver.py push HOST REF FILE [USER PASSWORD]    # FILE relative to the cwd
    python oras_driver.py pull HOST REF OUTDIR [USER PASSWORD]  # prints each pulled file

With USER and PASSWORD the client logs in first (`OrasClient.login`, which writes the docker
config under $HOME); without them it is anonymous. Either way oras-py does the token flow itself:
a 401 names the realm, it asks there for a token and retries with it.

Exit 0 on success, 3 when the registry refused (oras-py's message on stderr), anything else on
an unexpected error (a traceback).
"""

import sys

import oras.client


def main(argv):
    if len(argv) not in (4, 6) or argv[0] not in ("push", "pull"):
        sys.exit(f"usage: {sys.argv[0]} push|pull HOST REF PATH [USER PASSWORD]")
    command, host, ref, path = argv[:4]
    client = oras.client.OrasClient(hostname=host, insecure=True)
    if len(argv) == 6:
        client.login(username=argv[4], password=argv[5], hostname=host)
    try:
        if command == "push":
            client.push(target=f"{host}/{ref}", files=[path])
        else:
            for f in client.pull(target=f"{host}/{ref}", outdir=path):
                print(f)
    # oras-py reports a refused request as ValueError("Issue with URL: Reason").
    except ValueError as e:
        print(f"refused: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main(sys.argv[1:])
