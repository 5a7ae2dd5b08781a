#!/usr/bin/env python3
"""One timed blob push for bench/run.sh, over one keep-alive connection, as registry clients
(containerd, skopeo, docker) push: monolithic (POST, then PUT with the whole body) or chunked
(POST, one PATCH per chunk file with Content-Range following each Location, then PUT). A loop of
curl processes would time this machine's process start-up (~20 ms per PATCH here) more than the
server. Prints the seconds taken; exits non-zero on any unexpected status.

usage: push.py BASE REPO DIGEST mono FILE | push.py BASE REPO DIGEST chunked CHUNK_FILE..."""
import http.client, os, sys, time, urllib.parse
base, repo, digest, mode = sys.argv[1:5]
files = sys.argv[5:]
u = urllib.parse.urlsplit(base)
# 1 MiB reads from the file per send (the default is 8 KiB).
conn = http.client.HTTPConnection(u.hostname, u.port, blocksize=1 << 20)
conn.connect()
def req(method, url, body=None, headers=None, want=None):
    conn.request(method, url, body=body, headers=headers or {})
    r = conn.getresponse(); r.read()
    if want and r.status != want:
        sys.exit(f"{method} {url}: {r.status}")
    return r
def loc(r):
    l = r.getheader("Location"); p = urllib.parse.urlsplit(l)
    return p.path + ("?" + p.query if p.query else "")
def sep(l): return "&" if "?" in l else "?"
t0 = time.monotonic()
l = loc(req("POST", f"/v2/{repo}/blobs/uploads/", want=202))
if mode == "mono":
    size = os.path.getsize(files[0])
    with open(files[0], "rb") as f:
        req("PUT", f"{l}{sep(l)}digest={digest}", body=f, headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)}, want=201)
else:
    off = 0
    for name in files:
        n = os.path.getsize(name)
        with open(name, "rb") as f:
            l = loc(req("PATCH", l, body=f, headers={"Content-Type": "application/octet-stream", "Content-Length": str(n), "Content-Range": f"{off}-{off+n-1}"}, want=202))
        off += n
    req("PUT", f"{l}{sep(l)}digest={digest}", body=b"", headers={"Content-Length": "0"}, want=201)
print(f"{time.monotonic() - t0:.4f}")
