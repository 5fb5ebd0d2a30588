"""The offline verifier against the public RFC 9162 vectors (transparency-dev/merkle testdata)
and the C2SP signed-note example; property tests of proof generation against verification."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scf.projections import proofcheck as pc
from scf.projections.tlog import MemoryTree

DATA = Path(__file__).parent / "data" / "rfc9162"
INCLUSION = sorted((DATA / "inclusion").rglob("*.json"))
CONSISTENCY = sorted((DATA / "consistency").rglob("*.json"))


def _b(v):
    return base64.b64decode(v) if v else b""


def _proof(v):
    return [base64.b64decode(p) for p in (v or [])]


def test_all_vector_files_are_present():
    # every case file of the published testdata (98 inclusion, 98 consistency)
    assert len(INCLUSION) == 98
    assert len(CONSISTENCY) == 98


@pytest.mark.parametrize("path", INCLUSION, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_inclusion_vector(path):
    case = json.loads(path.read_text())
    args = (case["leafIdx"], case["treeSize"], _b(case["leafHash"]), _proof(case["proof"]), _b(case["root"]))
    if case["wantErr"]:
        with pytest.raises(pc.ProofError):
            pc.verify_inclusion(*args)
    else:
        pc.verify_inclusion(*args)


@pytest.mark.parametrize("path", CONSISTENCY, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_consistency_vector(path):
    case = json.loads(path.read_text())
    args = (case["size1"], case["size2"], _b(case["root1"]), _b(case["root2"]), _proof(case["proof"]))
    if case["wantErr"]:
        with pytest.raises(pc.ProofError):
            pc.verify_consistency(*args)
    else:
        pc.verify_consistency(*args)


def test_happy_path_proofs_are_the_ones_we_generate():
    """The vectors' tree of 8 leaves: leaf i's data is RFC 6962's test input; our generator
    gives the published proofs and root."""
    leaves = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f")]
    tree = MemoryTree([pc.leaf_hash(x) for x in leaves])
    case = json.loads((DATA / "inclusion" / "1" / "happy-path.json").read_text())
    assert tree.root(8) == _b(case["root"])
    assert tree.inclusion(case["leafIdx"], 8) == _proof(case["proof"])
    ccase = json.loads((DATA / "consistency" / "1" / "happy-path.json").read_text())
    assert tree.consistency(ccase["size1"], ccase["size2"]) == _proof(ccase["proof"])


# The example of the C2SP signed-note spec (and Go's golang.org/x/mod/sumdb/note tests).
NOTE_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
NOTE = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"


def test_signed_note_spec_example():
    v = pc.parse_verifier_key(NOTE_VKEY)
    assert pc.open_note(NOTE, v).startswith("If you think cryptography")
    forged = NOTE.replace("your problem,", "your problems,")
    with pytest.raises(pc.ProofError, match="bad signature by PeterNeumann"):
        pc.open_note(forged, v)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), data=st.data())
def test_generated_proofs_verify(n, data):
    leaves = [pc.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    tree = MemoryTree(leaves)
    size = data.draw(st.integers(1, n))
    index = data.draw(st.integers(0, size - 1))
    root = tree.root(size)
    assert root == pc.root_of(leaves[:size])
    pc.verify_inclusion(index, size, leaves[index], tree.inclusion(index, size), root)
    old = data.draw(st.integers(1, size))
    pc.verify_consistency(old, size, tree.root(old), root, tree.consistency(old, size))
    # Any other leaf, or a flipped bit in the proof, fails.
    other = pc.leaf_hash(b"not in the log")
    with pytest.raises(pc.ProofError):
        pc.verify_inclusion(index, size, other, tree.inclusion(index, size), root)
    proof = tree.consistency(old, size)
    if proof:
        k = data.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[k] = bytes([bad[k][0] ^ 1]) + bad[k][1:]
        with pytest.raises(pc.ProofError):
            pc.verify_consistency(old, size, tree.root(old), root, bad)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**20) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12,
)


def _valid_bundle():
    from scf.bus.signing import SigningKey

    key = SigningKey.generate("k")
    leaves = [pc.leaf_hash(b"e%d" % i) for i in range(5)]
    tree = MemoryTree(leaves)
    body = pc.Checkpoint("o", 5, tree.root()).body()
    note = body + "\n" + pc.signature_line("o", key.public_raw, base64.b64decode(key.sign(body.encode())))
    bundle = {"kind": "scf.proof.inclusion/v1", "checkpoint": note, "leaf_index": 3, "tree_size": 5,
              "entry": base64.b64encode(b"e3").decode(), "proof": [base64.b64encode(h).decode() for h in tree.inclusion(3, 5)]}
    return bundle, pc.verifier_key("o", key.public_raw)


BUNDLE, VKEY = _valid_bundle()


def test_the_valid_bundle_verifies():
    assert pc.verify_bundle(BUNDLE, VKEY)["leaf_index"] == 3


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(BUNDLE)), value=_json)
def test_hostile_bundles_fail_with_a_proof_error_only(field, value):
    """Any field replaced by any JSON value: verified, or refused with ProofError — never
    another exception (a client's verifier must not crash on what it is handed)."""
    bad = dict(BUNDLE, **{field: value})
    try:
        pc.verify_bundle(json.dumps(bad), VKEY)
    except pc.ProofError:
        pass


@settings(max_examples=200, deadline=None)
@given(junk=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_hostile_bytes_and_notes_fail_with_a_proof_error_only(junk):
    for call in (
        lambda: pc.verify_bundle(junk, VKEY),
        lambda: pc.open_note(junk.decode("utf-8", "replace"), pc.parse_verifier_key(VKEY)),
        lambda: pc.parse_verifier_key(junk.decode("utf-8", "replace")),
        lambda: pc.parse_checkpoint(junk.decode("utf-8", "replace")),
    ):
        try:
            call()
        except pc.ProofError:
            pass
