#!/usr/bin/env python3
"""Writes one registry's content for bench/gc.sh straight into storage and metadata: in Berth's
layout on SQLite + disk (rows and blob files), on PostgreSQL + S3 (rows and blob objects), and
in CNCF Distribution's (filesystem driver layout), so every GC sees the same images without
hours of pushes.

MANIFESTS image manifests in REPOS repositories, each with a config and LAYERS-1 layers of its
own (tiny, distinct bytes): MANIFESTS * LAYERS blobs. Even-numbered manifests are tagged;
odd-numbered ones are untagged, and created a day ago, so GC with an untagged age drops them
and then their blobs: half the manifests and half the blobs are garbage.

Berth's rows are those a push would leave, quota accounting included (`namespace_blobs`,
`namespace_quotas`), so GC's bookkeeping is the real one. The schema comes from `berth migrate`;
this only inserts.

usage: gc_seed.py berth-fs DATA_DIR
       gc_seed.py berth-pg POSTGRES_URL s3://BUCKET/PREFIX
       gc_seed.py distribution ROOT

berth-pg loads the rows with psql's \\copy and PUTs the blobs to the S3 API at
BERTH_TEST_S3_ENDPOINT (else AWS_ENDPOINT_URL), path-style, signed with AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY and AWS_REGION, from SEED_PROCS processes (2) of SEED_THREADS threads
(16) each, under the keys Berth's S3 store uses: PREFIX/blobs/sha256/HEX.
"""

import datetime
import hashlib
import hmac
import http.client
import json
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

MANIFESTS = int(os.environ.get("MANIFESTS", "100000"))
LAYERS = int(os.environ.get("LAYERS", "10"))
REPOS = int(os.environ.get("REPOS", "100"))
NOW = int(time.time())
OLD = NOW - 86400

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def log(msg):
    print(f"[{time.strftime('%T')}] gc_seed.py: {msg}", file=sys.stderr, flush=True)


def blob_bytes(m, j):
    return f"bench blob {m}/{j}\n".encode()


def sha(b):
    return hashlib.sha256(b).hexdigest()


def image_blobs(m):
    """[(hex, bytes)] of manifest m: its config, then its layers."""
    return [(sha(b), b) for b in (blob_bytes(m, j) for j in range(LAYERS))]


def images():
    """(repo index, manifest index, manifest bytes, [(hex, bytes)], tagged)"""
    for m in range(MANIFESTS):
        blobs = image_blobs(m)
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + blobs[0][0],
                "size": len(blobs[0][1]),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": "sha256:" + h,
                    "size": len(b),
                }
                for h, b in blobs[1:]
            ],
        }
        content = json.dumps(doc, separators=(",", ":")).encode()
        yield m * REPOS // MANIFESTS, m, content, blobs, m % 2 == 0


def repo_name(r):
    return f"bench/app{r}"


def namespace(repo):
    return repo.split("/", 1)[0]


def write_file(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


# Berth's tables this fills, and their columns, in an order the foreign keys accept.
COLUMNS = {
    "repositories": ("id", "name"),
    "blobs": ("digest", "size", "created_at", "last_referenced_at"),
    "repository_blobs": ("repository_id", "digest", "created_at", "last_referenced_at"),
    "manifests": ("id", "repository_id", "digest", "media_type", "content", "created_at"),
    "manifest_blobs": ("manifest_id", "digest"),
    "tags": ("repository_id", "name", "manifest_id", "updated_at"),
    "namespace_blobs": ("namespace", "digest", "size", "refs"),
    "namespace_quotas": ("namespace", "usage_bytes"),
}


def berth_rows(on_blob=None):
    """(table, row) of Berth's metadata for images(); calls on_blob(hex, bytes) for each blob.
    Every blob belongs to one manifest, so each counts once in its namespace's usage."""
    usage = {}
    for r in range(REPOS):
        yield "repositories", (r + 1, repo_name(r))
    for r, m, content, blobs, tagged in images():
        when = NOW if tagged else OLD
        ns = namespace(repo_name(r))
        usage[ns] = usage.get(ns, 0) + len(content)
        for h, b in blobs:
            if on_blob:
                on_blob(h, b)
            d = "sha256:" + h
            yield "blobs", (d, len(b), when, when)
            yield "repository_blobs", (r + 1, d, when, when)
            yield "manifest_blobs", (m + 1, d)
            yield "namespace_blobs", (ns, d, len(b), 1)
            usage[ns] += len(b)
        yield "manifests", (m + 1, r + 1, "sha256:" + sha(content), OCI_MANIFEST, content, when)
        if tagged:
            yield "tags", (r + 1, f"t{m}", m + 1, when)
    for ns, used in sorted(usage.items()):
        yield "namespace_quotas", (ns, used)


def berth_fs(data_dir):
    """Blob files and rows in the SQLite database `berth migrate` created."""
    db = sqlite3.connect(os.path.join(data_dir, "metadata.db"))
    db.execute("PRAGMA synchronous=OFF")
    pending = {t: [] for t in COLUMNS}

    def flush():
        for table, rows in pending.items():
            cols = COLUMNS[table]
            db.executemany(
                f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                rows,
            )
            rows.clear()

    def on_blob(h, b):
        write_file(os.path.join(data_dir, "blobs", "sha256", h[:2], h), b)

    for n, (table, row) in enumerate(berth_rows(on_blob)):
        pending[table].append(row)
        if n % 200000 == 199999:
            flush()
    flush()
    db.commit()


def tsv_field(v):
    # COPY's text format: bytea as \x and hex, its backslash escaped. No other value here has
    # a tab, newline or backslash.
    return "\\\\x" + v.hex() if isinstance(v, bytes) else str(v)


def load_postgres(url, tmp):
    """Rows into the PostgreSQL database `berth migrate` created, through TSV files and
    psql's \\copy, in one transaction; then the identity sequences past the ids used, and
    statistics, as a registry that grew by pushes would have."""
    files = {t: open(os.path.join(tmp, t + ".tsv"), "w") for t in COLUMNS}
    for table, row in berth_rows():
        files[table].write("\t".join(map(tsv_field, row)) + "\n")
    for f in files.values():
        f.close()
    script = ["\\set ON_ERROR_STOP on", "BEGIN;"]
    for table, cols in COLUMNS.items():
        path = os.path.join(tmp, table + ".tsv").replace("'", "''")
        script.append(f"\\copy {table} ({', '.join(cols)}) FROM '{path}'")
    for table in ("repositories", "manifests"):
        script.append(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}));"
        )
    script += ["COMMIT;", "ANALYZE;"]
    subprocess.run(
        ["psql", "-q", "-X", url], input="\n".join(script) + "\n", text=True,
        stdout=subprocess.DEVNULL, check=True,
    )


class S3:
    """PUTs over one keep-alive connection, signed with AWS Signature Version 4 (path-style)."""

    def __init__(self, endpoint, bucket, prefix):
        u = urllib.parse.urlsplit(endpoint)
        self.https = u.scheme == "https"
        self.host = u.netloc
        self.base = (u.path.rstrip("/") + "/" + bucket).replace("//", "/")
        self.prefix = prefix.strip("/")
        self.key_id = os.environ["AWS_ACCESS_KEY_ID"]
        self.secret = os.environ["AWS_SECRET_ACCESS_KEY"]
        self.region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.conn = None
        self.day = None

    def blob_key(self, h):
        """The key of a blob in Berth's S3 store (storage/s3.rs, blob_key)."""
        rest = f"blobs/sha256/{h}"
        return f"{self.prefix}/{rest}" if self.prefix else rest

    def signing_key(self, day):
        if day != self.day:
            k = ("AWS4" + self.secret).encode()
            for part in (day, self.region, "s3", "aws4_request"):
                k = hmac.new(k, part.encode(), hashlib.sha256).digest()
            self.day, self.key = day, k
        return self.key

    def put(self, key, body, body_sha):
        path = urllib.parse.quote(f"{self.base}/{key}", safe="/-_.~")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        signed = "host;x-amz-content-sha256;x-amz-date"
        canonical = (
            f"PUT\n{path}\n\nhost:{self.host}\nx-amz-content-sha256:{body_sha}\n"
            f"x-amz-date:{stamp}\n\n{signed}\n{body_sha}"
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{sha(canonical.encode())}"
        sig = hmac.new(self.signing_key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        headers = {
            "x-amz-content-sha256": body_sha,
            "x-amz-date": stamp,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={self.key_id}/{scope}, "
            f"SignedHeaders={signed}, Signature={sig}",
        }
        for attempt in range(6):
            try:
                if self.conn is None:
                    cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
                    self.conn = cls(self.host, timeout=60)
                self.conn.request("PUT", path, body=body, headers=headers)
                r = self.conn.getresponse()
                text = r.read()
                if r.status == 200:
                    return
                if r.status < 500:
                    raise RuntimeError(f"PUT {path}: {r.status} {text[:300]!r}")
                err = f"{r.status} {text[:200]!r}"
            except (OSError, http.client.HTTPException) as e:
                err = repr(e)
                self.conn = None
            time.sleep(0.2 * 2**attempt)
        raise RuntimeError(f"PUT {path} failed: {err}")


def put_blobs(endpoint, bucket, prefix, proc, procs, threads, done):
    """Process `proc` of `procs`: its threads PUT the blobs of manifests m with
    m % (procs * threads) equal to their number."""
    errors = []

    def worker(t):
        s3 = S3(endpoint, bucket, prefix)
        stride = procs * threads
        n = 0
        try:
            for m in range(proc * threads + t, MANIFESTS, stride):
                for h, b in image_blobs(m):
                    # The digest is the SHA-256 of the bytes: the payload hash to sign.
                    s3.put(s3.blob_key(h), b, h)
                n += 1
                if n % 100 == 0:
                    with done.get_lock():
                        done.value += 100 * LAYERS
        except Exception as e:  # noqa: BLE001 - reported, then the process fails
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        print(f"gc_seed.py: {errors[0]}", file=sys.stderr)
        sys.exit(1)


def berth_pg(url, storage):
    """Rows in the PostgreSQL database at `url` (migrated by `berth migrate`) and blob objects
    in the bucket and prefix of `storage` (s3://BUCKET/PREFIX), as Berth's S3 store keeps them."""
    if not storage.startswith("s3://"):
        sys.exit(f"gc_seed.py: storage must be s3://BUCKET/PREFIX, not {storage!r}")
    bucket, _, prefix = storage[len("s3://"):].partition("/")
    endpoint = os.environ.get("BERTH_TEST_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        sys.exit("gc_seed.py: set BERTH_TEST_S3_ENDPOINT (eval \"$(bash scripts/garage.sh)\")")
    procs = int(os.environ.get("SEED_PROCS", "2"))
    threads = int(os.environ.get("SEED_THREADS", "16"))
    total = MANIFESTS * LAYERS
    start = time.time()
    done = multiprocessing.Value("q", 0)
    ctx = multiprocessing.get_context("fork")
    workers = [
        ctx.Process(target=put_blobs, args=(endpoint, bucket, prefix, p, procs, threads, done))
        for p in range(procs)
    ]
    for w in workers:
        w.start()
    tmp = tempfile.mkdtemp(prefix="berth-gc-seed.", dir=os.environ.get("BENCH_TMP"))
    try:
        load_postgres(url, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"PostgreSQL rows loaded in {time.time() - start:.0f} s")
    last = time.time()
    while any(w.is_alive() for w in workers):
        time.sleep(1)
        if time.time() - last >= 60:
            last = time.time()
            log(f"{done.value} of {total} blobs PUT ({done.value / (last - start):.0f}/s)")
    for w in workers:
        w.join()
        if w.exitcode != 0:
            sys.exit("gc_seed.py: a PUT worker failed")
    secs = time.time() - start
    log(f"{total} blobs PUT in {secs:.0f} s ({total / secs:.0f}/s)")


def distribution(root):
    """The filesystem driver's layout under ROOT/docker/registry/v2."""
    v2 = os.path.join(root, "docker", "registry", "v2")

    def blob_data(h, b):
        write_file(os.path.join(v2, "blobs", "sha256", h[:2], h, "data"), b)

    for r, m, content, blobs, tagged in images():
        repo = os.path.join(v2, "repositories", repo_name(r))
        for h, b in blobs:
            blob_data(h, b)
            write_file(os.path.join(repo, "_layers", "sha256", h, "link"), b"sha256:" + h.encode())
        # Distribution's GC fails on a repository without a tags directory.
        os.makedirs(os.path.join(repo, "_manifests", "tags"), exist_ok=True)
        mh = sha(content)
        blob_data(mh, content)
        link = b"sha256:" + mh.encode()
        write_file(os.path.join(repo, "_manifests", "revisions", "sha256", mh, "link"), link)
        if tagged:
            tag = os.path.join(repo, "_manifests", "tags", f"t{m}")
            write_file(os.path.join(tag, "current", "link"), link)
            write_file(os.path.join(tag, "index", "sha256", mh, "link"), link)


if __name__ == "__main__":
    modes = {"berth-fs": (berth_fs, 1), "berth-pg": (berth_pg, 2), "distribution": (distribution, 1)}
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode not in modes or len(sys.argv) != 2 + modes[mode][1]:
        sys.exit(__doc__[__doc__.index("usage:"):].split("\n\n")[0])
    modes[mode][0](*sys.argv[2:])
