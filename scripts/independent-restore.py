#!/usr/bin/env python3
"""An independent reader of the custos format, written from docs/FORMAT.md alone.

Restores a snapshot of a tenant from a local-directory store, given the
tenant's local key file (local key provider). It shares no code with custos:
if it restores byte-identical files, the spec is complete.

    independent-restore.py STORE_DIR KEYS_DIR TENANT SNAPSHOT|latest TARGET_DIR

Needs: cryptography (AES-GCM, HKDF), blake3, zstandard.
"""

import base64
import datetime
import json
import os
import re
import struct
import sys

import blake3
import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HEADER_LEN = 84
TAG = 16
SEGMENT = 65536


def hkdf(ikm, info, length, salt=None):
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def label(name, tenant, epoch):  # FORMAT.md §2: L(label)
    return name + b"\x00" + tenant + b"\x00" + struct.pack(">I", epoch)


class Fail(Exception):
    pass


class Tenant:
    def __init__(self, store, keys_dir, tenant):
        self.root = os.path.join(store, "tenants", tenant)
        self.keys_dir = keys_dir
        self.tenant = tenant.encode()
        desc = json.load(open(os.path.join(self.root, "tenant.json")))
        if desc["format"] != "custos-tenant/1" or desc["tenant"] != tenant:
            raise Fail("not a descriptor of this tenant")
        if desc["state"] != "active":
            raise Fail("tenant is " + desc["state"])
        self.tdks = {}

    # §3: unwrap the epoch's data key with the local key file.
    def tdk(self, epoch):
        if epoch in self.tdks:
            return self.tdks[epoch]
        env = json.load(open(os.path.join(self.root, "keys", str(epoch))))
        assert env["format"] == "custos-envelope/1" and env["epoch"] == epoch
        name = env["key"].split(":", 1)[1]
        assert env["key"].startswith("local:")
        keyfile = json.load(open(os.path.join(self.keys_dir, name + ".key")))
        ct = base64.b64decode(env["wrapped"]["ciphertext"])
        version = struct.unpack(">I", ct[:4])[0]
        material = next(base64.b64decode(v["material"]) for v in keyfile["versions"] if v["version"] == version)
        ctx = {"custos:epoch": str(epoch), "custos:purpose": "tenant-data-key", "custos:tenant": self.tenant.decode()}
        canonical = b"".join(
            struct.pack(">I", len(k)) + k.encode() + struct.pack(">I", len(v)) + v.encode() for k, v in sorted(ctx.items())
        )
        wrap_key = hkdf(material, b"custos/v1/local-wrap\x00" + name.encode(), 32)
        aad = b"custos/v1/local-wrap\x00" + name.encode() + b"\x00" + struct.pack(">I", version) + canonical
        tdk = AESGCM(wrap_key).decrypt(ct[4:16], ct[16:], aad)
        fingerprint = hkdf(tdk, b"custos/v1/fingerprint", 8).hex()
        if fingerprint != env["fingerprint"]:
            raise Fail("envelope fingerprint mismatch")
        self.tdks[epoch] = tdk
        return tdk

    def chunk_id_key(self, epoch):
        return hkdf(self.tdk(epoch), label(b"custos/v1/chunk-id", self.tenant, epoch), 32)

    # §5: check a header and return a segment opener.
    def opener(self, obj, kind, object_id):
        if obj[:6] != b"CUSTOS" or obj[6] != 1 or obj[7:8] != kind:
            raise Fail("bad header")
        epoch = struct.unpack(">I", obj[8:12])[0]
        tag = hashes.Hash(hashes.SHA256())
        tag.update(b"custos/v1/tenant-tag" + self.tenant)
        if obj[12:20] != tag.finalize()[:8]:
            raise Fail("object of another tenant")
        if obj[20:52] != object_id:
            raise Fail("object id does not match its name")
        okm = hkdf(self.tdk(epoch), label(b"custos/v1/seal", self.tenant, epoch) + kind, 64, salt=object_id)
        if okm[32:] != obj[52:84]:
            raise Fail("key commitment mismatch")
        aead = AESGCM(okm[:32])
        prefix = b"custos/v1/aad" + obj[:52] + struct.pack(">H", len(self.tenant)) + self.tenant

        def open_segment(i, last, sealed):
            tail = struct.pack(">Q", i) + bytes([last])
            return aead.decrypt(b"\x00\x00\x00" + tail, sealed, prefix + tail)

        return epoch, open_segment

    def open_stream(self, obj, kind, object_id):
        epoch, open_segment = self.opener(obj, kind, object_id)
        body = obj[HEADER_LEN:]
        n = max(1, -(-len(body) // (SEGMENT + TAG)))
        plain = b"".join(
            open_segment(i, int(i == n - 1), body[i * (SEGMENT + TAG) : (i + 1) * (SEGMENT + TAG)]) for i in range(n)
        )
        return epoch, zstd_decompress(plain)

    def read(self, *parts):
        return open(os.path.join(self.root, *parts), "rb").read()


def zstd_decompress(data):
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def instant(text):  # §8: `time` ordered as an instant (RFC 3339, up to nanoseconds)
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", text)
    if m is None:
        raise Fail("bad time %r" % text)
    whole = datetime.datetime.fromisoformat(m[1] + ("+00:00" if m[3] == "Z" else m[3]))
    seconds = (whole - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)) // datetime.timedelta(seconds=1)
    return seconds * 10**9 + int((m[2] or "").ljust(9, "0"))


def text_or_b64(e, name):  # §9: `name` or `name_b64`; null counts as absent
    if e.get(name) is not None:
        return e[name].encode()
    if e.get(name + "_b64") is not None:
        return base64.b64decode(e[name + "_b64"])
    return None


def main(store, keys_dir, tenant_name, wanted, target):
    t = Tenant(store, keys_dir, tenant_name)
    # §8: snapshots; choose the requested one (or the newest).
    snaps = []
    for name in os.listdir(os.path.join(t.root, "snapshots")):
        epoch, plain = t.open_stream(t.read("snapshots", name), b"S", bytes.fromhex(name))
        doc = json.loads(plain)
        assert doc["id"] == name and doc["tenant"] == tenant_name and doc["epoch"] == epoch
        snaps.append(doc)
    snaps.sort(key=lambda s: (instant(s["time"]), s["id"]))
    snap = snaps[-1] if wanted == "latest" else next(s for s in snaps if s["id"].startswith(wanted))
    epoch = snap["epoch"]

    # §7: the index. A blob listed more than once is read from a listing
    # whose pack exists.
    def pack_exists(pack):
        return os.path.exists(os.path.join(t.root, "packs", pack[:2], pack))

    # §10: the snapshot's blobs are all listed by index files of its epoch;
    # those of other epochs (a shredded one's included) are not needed.
    index = {}
    for name in os.listdir(os.path.join(t.root, "index")):
        obj = t.read("index", name)
        if struct.unpack(">I", obj[8:12])[0] != epoch:
            continue
        _, plain = t.open_stream(obj, b"I", bytes.fromhex(name))
        pos = 0
        while pos < len(plain):
            pack = plain[pos : pos + 32].hex()
            (n,) = struct.unpack(">I", plain[pos + 32 : pos + 36])
            pos += 36
            for _ in range(n):
                blob = plain[pos : pos + 32].hex()
                seg, off, sealed, raw = struct.unpack(">IIII", plain[pos + 33 : pos + 49])
                have = index.get(blob)
                if have is None or (not pack_exists(have[0]) and pack_exists(pack)):
                    index[blob] = (pack, seg, off, sealed, raw)
                pos += 49

    chunk_key = t.chunk_id_key(epoch)
    openers = {}

    # §6: one blob.
    def blob(blob_id):
        pack, seg, off, sealed, raw = index[blob_id]
        data = t.read("packs", pack[:2], pack)
        if pack not in openers:
            openers[pack] = t.opener(data, b"P", bytes.fromhex(pack))[1]
        frame = openers[pack](seg, 0, data[off : off + sealed])
        plain = frame[1:] if frame[0] == 0 else zstd_decompress(frame[1:])
        if len(plain) != raw or blake3.blake3(plain, key=chunk_key).hexdigest() != blob_id:
            raise Fail("blob %s does not verify" % blob_id)
        return plain

    # §9, §10: the tree, in order.
    lines = b"".join(blob(b) for b in snap["tree"]).split(b"\n")
    assert lines[-1] == b""
    dirs = []
    links = {}  # §9: hard-link group (the `hardlink` path) -> first name restored
    for line in lines[:-1]:
        e = json.loads(line)
        path = text_or_b64(e, "path")
        parts = path.split(b"/")
        assert path and b"\x00" not in path and all(p not in (b"", b".", b"..") for p in parts)
        dest = os.path.join(os.fsencode(target), path)
        mtime = e["mtime_ns"]
        if e["type"] == "dir":
            os.makedirs(dest, exist_ok=True)
            dirs.append((dest, e["mode"] & 0o7777, mtime))
        elif e["type"] == "symlink":
            link = text_or_b64(e, "target")
            os.symlink(link, dest)
            os.utime(dest, ns=(mtime, mtime), follow_symlinks=False)
        else:
            group = text_or_b64(e, "hardlink")
            if group is not None and group in links:
                os.link(links[group], dest)  # content, mode and mtime are the first name's
                continue
            with open(dest, "wb") as f:
                total = 0
                for b in e.get("blobs", []):
                    chunk = blob(b)
                    total += len(chunk)
                    f.write(chunk)
            if total != e.get("size", 0):
                raise Fail("size mismatch for %r" % path)
            os.chmod(dest, e["mode"] & 0o7777)
            os.utime(dest, ns=(mtime, mtime))
            if group is not None:
                links[group] = dest
    for dest, mode, mtime in reversed(dirs):
        os.chmod(dest, mode)
        os.utime(dest, ns=(mtime, mtime))
    print("restored snapshot %s: %d entries" % (snap["id"][:8], len(lines) - 1))


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    try:
        main(*sys.argv[1:])
    except Fail as e:
        sys.exit("independent-restore: " + str(e))
