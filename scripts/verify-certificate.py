#!/usr/bin/env python3
"""Verifies a custos deletion certificate offline, independently of custos.

    verify-certificate.py CERTIFICATE.json VERIFIER-KEY-FILE

VERIFIER-KEY-FILE holds the audit verifier key as `custos audit public-key`
prints it: `<name>+<8 hex key id>+<base64(0x01 || Ed25519 public key)>`.
Needs only the Python standard library and `cryptography` (for Ed25519).
Exit status 0: valid; 1: invalid (the reason on stderr).

It follows docs/shredding.md ("Checking a certificate without custos"):
canonical form, Ed25519 signature of the body, the audit record naming the
certificate and the digest of its body, the record's RFC 9162 inclusion proof
and the C2SP signed checkpoint it leads to.
"""

import base64
import hashlib
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# The formats this script knows; each is signed under its own name as label.
FORMATS = ("custos-deletion-certificate/1", "custos-deletion-certificate/2")


class Invalid(Exception):
    pass


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def pretty(value):
    return (json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


def sha256(b):
    return hashlib.sha256(b).digest()


def parse_verifier_key(text):
    name, key_id, key64 = text.strip().split("+", 2)
    raw = base64.b64decode(key64, validate=True)
    if len(raw) != 33 or raw[0] != 0x01:
        raise Invalid("not an Ed25519 verifier key")
    public = raw[1:]
    if sha256(name.encode() + b"\n\x01" + public)[:4].hex() != key_id.lower():
        raise Invalid("verifier key: the key id does not match")
    return name, bytes.fromhex(key_id), Ed25519PublicKey.from_public_bytes(public)


def verify_ed25519(key, signature, message, what):
    try:
        key.verify(signature, message)
    except InvalidSignature:
        raise Invalid(f"{what}: bad signature") from None


def verify_checkpoint(note, name, key_id, key):
    """C2SP signed note + tlog checkpoint: returns (size, root)."""
    text, sep, sigs = note.rpartition("\n\n")
    if not sep:
        raise Invalid("checkpoint: no signature block")
    text += "\n"
    signed = False
    for line in sigs.rstrip("\n").split("\n"):
        if not line.startswith("\u2014 "):
            raise Invalid("checkpoint: malformed signature line")
        sig_name, sig64 = line[2:].split(" ", 1)
        raw = base64.b64decode(sig64, validate=True)
        if sig_name != name or raw[:4] != key_id:
            continue
        verify_ed25519(key, raw[4:], text.encode(), "checkpoint")
        signed = True
    if not signed:
        raise Invalid("checkpoint: not signed by the trusted key")
    origin, size, root64 = text.rstrip("\n").split("\n")[:3]
    if origin != name:
        raise Invalid("checkpoint: of another log")
    return int(size), base64.b64decode(root64, validate=True)


def root_from_inclusion(leaf, index, size, proof):
    """RFC 9162 section 2.1.3.2."""
    if index >= size:
        raise Invalid("inclusion proof: index out of range")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise Invalid("inclusion proof: too long")
        if fn & 1 or fn == sn:
            r = sha256(b"\x01" + p + r)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            r = sha256(b"\x01" + r + p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise Invalid("inclusion proof: too short")
    return r


def verify(raw, key_text):
    name, key_id, key = parse_verifier_key(key_text)
    doc = json.loads(raw)
    if raw != pretty(doc):
        raise Invalid("not in canonical form (edited or reformatted)")
    if set(doc) != {"certificate", "signature"}:
        raise Invalid("expected the members certificate and signature")
    sig = doc["signature"]
    if sig["algorithm"] != "ed25519" or sig["signer"] != key_text.strip():
        raise Invalid("not signed by the trusted key")
    body = doc["certificate"]
    if body.get("format") not in FORMATS:
        raise Invalid(f"format {body.get('format')!r} is not one this script knows {FORMATS}")
    label = body["format"].encode() + b"\n"
    verify_ed25519(key, base64.b64decode(sig["value"], validate=True), label + canonical(body), "certificate")

    unanchored = {k: v for k, v in body.items() if k != "audit"}
    digest = hashlib.sha256(canonical(unanchored)).hexdigest()
    anchor = body["audit"]
    evidence = anchor["evidence"]
    line = evidence["record"].encode()
    record = json.loads(line)
    leaf = sha256(b"\x00" + line)
    if leaf.hex() != anchor["leaf_hash"] or record["seq"] != anchor["seq"]:
        raise Invalid("audit anchor: record seq or leaf hash differ")
    if record["seq"] != evidence["leaf_index"]:
        raise Invalid("audit anchor: the proof is for another leaf")
    if record["event"] != "shred.certificate.begin" or record["tenant"] != body["tenant"]:
        raise Invalid("audit record: not this certificate's")
    details = record["details"]
    if details.get("certificate_id") != body["id"] or details.get("certificate_sha256") != digest:
        raise Invalid("audit record: names another certificate or body digest")
    if anchor["body_sha256"] != digest:
        raise Invalid("audit anchor: body digest differs")
    size, root = verify_checkpoint(evidence["checkpoint"], name, key_id, key)
    if size != evidence["tree_size"]:
        raise Invalid("checkpoint: size differs from the proof's")
    proof = [bytes.fromhex(h) for h in evidence["proof"]]
    if root_from_inclusion(leaf, evidence["leaf_index"], size, proof) != root:
        raise Invalid("inclusion proof: does not lead to the checkpoint's root")
    if not body["verification"]["passed"]:
        raise Invalid("the certificate states that verification failed")
    return body, record


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    raw = open(sys.argv[1], "rb").read()
    key_text = open(sys.argv[2]).read()
    try:
        body, record = verify(raw, key_text)
    except (Invalid, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        print(f"INVALID: {e}", file=sys.stderr)
        return 1
    what = f"epoch {body['epoch']} of tenant {body['tenant']}" if body.get("epoch") else f"tenant {body['tenant']}"
    print(f"valid: {what}, {body['guarantee']['kind']}, audit record #{record['seq']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
