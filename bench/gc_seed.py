#!/usr/bin/env python3
"""Writes one registry's content for bench/gc.sh straight into storage and metadata, in Berth's
layout (SQLite rows and blob files) and in CNCF Distribution's
(filesystem driver layout), so both GCs see the same images without hours of pushes.

MANIFESTS image manifests in REPOS repositories, each with a config and LAYERS-1 layers of its
own (tiny, distinct bytes): MANIFESTS * LAYERS blobs. Even-numbered manifests are tagged;
odd-numbered ones are untagged, and created a day ago, so GC with an untagged age drops them
and then their blobs: half the manifests and half the blobs are garbage.

usage: gc_seed.py berth-fs DATA_DIR | distribution ROOT
"""

import hashlib
import json
import os
import sqlite3
import sys
import time

MANIFESTS = int(os.environ.get("MANIFESTS", "100000"))
LAYERS = int(os.environ.get("LAYERS", "10"))
REPOS = int(os.environ.get("REPOS", "100"))
NOW = int(time.time())
OLD = NOW - 86400

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def blob_bytes(m, j):
    return f"bench blob {m}/{j}\n".encode()


def sha(b):
    return hashlib.sha256(b).hexdigest()


def images():
    """(repo index, manifest index, manifest bytes, [(hex, bytes)], tagged)"""
    for m in range(MANIFESTS):
        blobs = [blob_bytes(m, j) for j in range(LAYERS)]
        hexes = [sha(b) for b in blobs]
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": "sha256:" + hexes[0],
                "size": len(blobs[0]),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": "sha256:" + h,
                    "size": len(b),
                }
                for h, b in zip(hexes[1:], blobs[1:])
            ],
        }
        content = json.dumps(doc, separators=(",", ":")).encode()
        yield m * REPOS // MANIFESTS, m, content, list(zip(hexes, blobs)), m % 2 == 0


def repo_name(r):
    return f"bench/app{r}"


def write_file(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def berth_fs(data_dir):
    """Blob files and rows in the SQLite database `berth migrate` created."""
    db = sqlite3.connect(os.path.join(data_dir, "metadata.db"))
    db.execute("PRAGMA synchronous=OFF")
    db.executemany(
        "INSERT INTO repositories (id, name) VALUES (?, ?)",
        [(r + 1, repo_name(r)) for r in range(REPOS)],
    )
    blob_rows, link_rows, man_rows, mb_rows, tag_rows = [], [], [], [], []

    def flush():
        db.executemany(
            "INSERT INTO blobs (digest, size, created_at, last_referenced_at) VALUES (?,?,?,?)",
            blob_rows,
        )
        db.executemany(
            "INSERT INTO repository_blobs (repository_id, digest, created_at, last_referenced_at)"
            " VALUES (?,?,?,?)",
            link_rows,
        )
        db.executemany(
            "INSERT INTO manifests (id, repository_id, digest, media_type, content, created_at)"
            " VALUES (?,?,?,?,?,?)",
            man_rows,
        )
        db.executemany("INSERT INTO manifest_blobs (manifest_id, digest) VALUES (?,?)", mb_rows)
        db.executemany(
            "INSERT INTO tags (repository_id, name, manifest_id, updated_at) VALUES (?,?,?,?)",
            tag_rows,
        )
        for rows in (blob_rows, link_rows, man_rows, mb_rows, tag_rows):
            rows.clear()

    for r, m, content, blobs, tagged in images():
        when = NOW if tagged else OLD
        for h, b in blobs:
            write_file(os.path.join(data_dir, "blobs", "sha256", h[:2], h), b)
            blob_rows.append(("sha256:" + h, len(b), when, when))
            link_rows.append((r + 1, "sha256:" + h, when, when))
            mb_rows.append((m + 1, "sha256:" + h))
        man_rows.append((m + 1, r + 1, "sha256:" + sha(content), OCI_MANIFEST, content, when))
        if tagged:
            tag_rows.append((r + 1, f"t{m}", m + 1, when))
        if len(mb_rows) > 50000:
            flush()
    flush()
    db.commit()


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
    mode, target = sys.argv[1], sys.argv[2]
    {
        "berth-fs": berth_fs,
        "distribution": distribution,
    }[mode](target)
