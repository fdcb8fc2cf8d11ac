"""Encrypted bundles (age): nothing readable on the shared disk, restorable only with the key,
verifiable without it; per-wing bundles; an encrypted bundle directory as a sync replica."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyrage
import pytest

from palace.bundles import Owner
from palace.layout import layout_for
from palace.manifest import Manifest
from palace.vectors import VectorStore

from .helpers import cli_json, palace_rows, run_cli
from .test_export import assert_same, sample_with_closets, snapshot, unit

SECRET_TEXT = "the vault combination is 31-07-1999 and nobody else knows it"


def keypair(d: Path, name: str) -> tuple[Path, Path]:
    """An age identity file (as age-keygen writes it) and its public key file."""
    ident = pyrage.x25519.Identity.generate()
    (d / f"{name}.key").write_text(f"# created: by the test\n# public key: {ident.to_public()}\n{ident}\n")
    (d / f"{name}.pub").write_text(f"{ident.to_public()}\n")
    return d / f"{name}.key", d / f"{name}.pub"


def edit(palace: Path, changes: dict[str, str], deletes: tuple[str, ...] = (), seed: int = 9,
         wing: str = "mcp_memory") -> None:
    store = VectorStore(layout_for(palace))
    ids = sorted(changes)
    if ids:
        store.upsert(ids, [changes[i] for i in ids], [{"wing": wing, "room": "secrets"} for _ in ids],
                     unit(len(ids), seed))
    if deletes:
        store.delete(list(deletes))
    store.close()


@pytest.fixture(scope="module")
def palace(tmp_path_factory) -> Path:
    p = sample_with_closets(tmp_path_factory.mktemp("enc") / "palace")
    edit(p, {"drawer_team_notes_secret": SECRET_TEXT}, wing="team")
    return p


@pytest.fixture
def keys(tmp_path) -> dict[str, Path]:
    me, me_pub = keypair(tmp_path, "me")
    other, other_pub = keypair(tmp_path, "other")
    (tmp_path / "pass.txt").write_text("correct horse battery staple\n")
    (tmp_path / "wrong-pass.txt").write_text("incorrect horse\n")
    return {"me": me, "me_pub": me_pub, "other": other, "other_pub": other_pub,
            "pass": tmp_path / "pass.txt", "wrong_pass": tmp_path / "wrong-pass.txt"}


def every_byte(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_encrypted_bundle_holds_nothing_readable_and_restores_only_with_the_key(palace, keys, tmp_path):
    r = cli_json("export", "--palace", palace, "--out", tmp_path / "b", "--encrypt-to", keys["me_pub"])
    bundle = Path(r["bundle"])
    assert r["encrypted"] and r["counts"]["drawers"] == 364
    names = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert all(n.endswith(".age") for n in names if n != "manifest.json"), names
    blob = every_byte(bundle)
    for plain in (SECRET_TEXT.encode(), b"drawer_team_notes_secret", b"mcp_memory", b"minilm", b"PAR1"):
        assert plain not in blob, plain  # no text, no id, no wing, no model, not even a Parquet header
    outer = json.loads((bundle / "manifest.json").read_text())
    assert outer["counts"] == {} and outer["totals"] == {} and outer["embedder"] is None and outer["palace"] == ""
    assert outer["sizes"]["drawers.parquet.age"] == (bundle / "drawers.parquet.age").stat().st_size

    # the ciphertexts verify without a key; decrypted, the rows verify too; a wrong key is named
    v = cli_json("verify", "--bundle", bundle)
    assert v["ok"] and any("encrypted" in n for n in v["not_checked"])
    v = cli_json("verify", "--bundle", bundle, "--identity", keys["me"])
    assert v["ok"] and not any("encrypted" in n for n in v["not_checked"])
    v = cli_json("verify", "--bundle", bundle, "--identity", keys["other"], check=4)
    assert [f["code"] for f in v["findings"]] == ["bundle_key"] and str(keys["other"]) in v["findings"][0]["message"]

    # no key, a wrong key: a clear error naming the bundle, and nothing written
    for extra, says in (((), "it is encrypted"), (("--identity", keys["other"]), "does not decrypt with")):
        proc = run_cli("restore", bundle, "--palace", tmp_path / "r", *extra, check=1)
        assert says in proc.stderr and bundle.name in proc.stderr
        assert not (tmp_path / "r").exists()
    run_cli("restore", bundle, "--palace", tmp_path / "r", "--identity", keys["me"])
    assert_same(snapshot(palace), snapshot(tmp_path / "r"))


def test_decrypted_copies_are_private_and_removed(palace, keys, tmp_path, monkeypatch):
    """The plaintext a restore reads lives in a private temp directory that is gone afterwards."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    bundle = Path(cli_json("export", "--palace", palace, "--out", tmp_path / "b", "--encrypt-to", keys["me_pub"])
                  ["bundle"])
    run_cli("restore", bundle, "--palace", tmp_path / "r", "--identity", keys["me"], subprocess_=True)
    run_cli("restore", bundle, "--palace", tmp_path / "r2", "--identity", keys["other"], check=1, subprocess_=True)
    assert not [p for p in scratch.iterdir() if p.name.startswith("palace-etl-decrypted-")]


def test_incremental_encrypted_chain_from_public_keys_only(palace, keys, tmp_path):
    """The cron side holds only the public key: incrementals still chain (the state is kept on this
    machine), a change of keys or a lost state writes a full bundle, and the chain restores."""
    work = tmp_path / "palace"
    shutil.copytree(palace, work)
    out = tmp_path / "b"
    enc = ("--encrypt-to", keys["me_pub"])
    first = cli_json("export", "--palace", work, "--out", out, *enc, "--incremental")
    assert first["kind"] == "full"
    outer = Manifest.load(Path(first["bundle"]))  # whose it is, without naming the palace
    assert outer.palace == "" and set(outer.watermark) == {"owner"} and str(work) not in outer.to_json().decode()
    assert Owner(str(work)).owns(Path(first["bundle"])) and not Owner(str(palace)).owns(Path(first["bundle"]))
    gone = sorted(palace_rows(work))[0]
    edit(work, {"drawer_team_notes_secret": SECRET_TEXT + " (changed)", "drawer_team_notes_new": "a new one"},
         deletes=(gone,), wing="team")
    second = cli_json("export", "--palace", work, "--out", out, *enc, "--incremental")
    assert second["kind"] == "incremental" and second["counts"]["drawers"] == 2 and second["deleted"] == 1
    run_cli("restore", second["bundle"], "--palace", tmp_path / "r", "--identity", keys["me"])
    assert_same(snapshot(work), snapshot(tmp_path / "r"))
    assert run_cli("verify", "--bundle", second["bundle"], "--identity", keys["me"]).returncode == 0

    third = cli_json("export", "--palace", work, "--out", out, "--encrypt-to", keys["other_pub"], "--incremental")
    assert third["kind"] == "full" and "other keys" in third["full_because"]
    plain = cli_json("export", "--palace", work, "--out", out, "--incremental")
    assert plain["kind"] == "full" and "encrypted" in plain["full_because"]
    cli_json("export", "--palace", work, "--out", out, *enc)
    shutil.rmtree(Path.home() / ".cache" / "palace-etl" / "bundle-state")  # another machine, or a lost cache
    lost = cli_json("export", "--palace", work, "--out", out, *enc, "--incremental")
    assert lost["kind"] == "full" and "did not write it" in lost["full_because"]


def test_passphrase_bundles(palace, keys, tmp_path):
    bundle = Path(cli_json("export", "--palace", palace, "--out", tmp_path / "b", "--passphrase-file", keys["pass"],
                           "--encrypt-to", keys["me_pub"])["bundle"])
    assert (bundle / "key.age").is_file() and SECRET_TEXT.encode() not in every_byte(bundle)
    proc = run_cli("restore", bundle, "--palace", tmp_path / "x", "--passphrase-file", keys["wrong_pass"], check=1)
    assert "does not open it" in proc.stderr and not (tmp_path / "x").exists()
    run_cli("restore", bundle, "--palace", tmp_path / "r1", "--passphrase-file", keys["pass"])
    run_cli("restore", bundle, "--palace", tmp_path / "r2", "--identity", keys["me"])  # either opens it
    assert_same(snapshot(palace), snapshot(tmp_path / "r1"))
    assert_same(snapshot(palace), snapshot(tmp_path / "r2"))


@pytest.mark.parametrize("tamper", ["flip-a-byte", "rewritten-checksum", "swapped-file"])
def test_tampered_ciphertext_is_refused_and_nothing_written(palace, keys, tmp_path, tamper):
    out = tmp_path / "b"
    bundle = Path(cli_json("export", "--palace", palace, "--out", out, "--encrypt-to", keys["me_pub"])["bundle"])
    target = bundle / "drawers.parquet.age"
    if tamper == "swapped-file":  # a genuine ciphertext for the same key, from another bundle
        other = Path(cli_json("export", "--palace", palace, "--out", tmp_path / "o", "--encrypt-to",
                              keys["me_pub"], "--wing", "team")["bundle"])
        data = (other / "drawers.parquet.age").read_bytes()
    else:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x40
    target.write_bytes(bytes(data))
    if tamper != "flip-a-byte":  # whoever tampered also rewrote the plain manifest to match
        import hashlib

        m = json.loads((bundle / "manifest.json").read_text())
        m["files"]["drawers.parquet.age"] = hashlib.sha256(bytes(data)).hexdigest()
        m["sizes"]["drawers.parquet.age"] = len(data)
        (bundle / "manifest.json").write_text(json.dumps(m))
    else:
        v = cli_json("verify", "--bundle", bundle, check=4)  # caught without a key
        assert v["findings"][0]["code"] == "bundle_corrupt"
    v = cli_json("verify", "--bundle", bundle, "--identity", keys["me"], check=4)
    assert [f["code"] for f in v["findings"]] == ["bundle_corrupt"], v["findings"]
    run_cli("restore", bundle, "--palace", tmp_path / "r", "--identity", keys["me"], check=1)
    assert not (tmp_path / "r").exists()


def test_wing_bundle_shares_one_wing_and_is_no_sync_replica(palace, keys, tmp_path):
    out = tmp_path / "share"
    r = cli_json("export", "--palace", palace, "--out", out, "--wing", "team", "--encrypt-to", keys["other_pub"])
    assert r["wing"] == "team" and r["totals"] == {"drawers": 1, "closets": 0, "entities": 0, "triples": 0}
    run_cli("restore", r["bundle"], "--palace", tmp_path / "mate", "--identity", keys["other"])
    assert {m["metadata"]["wing"] for m in palace_rows(tmp_path / "mate").values()} == {"team"}
    assert not (tmp_path / "mate" / "knowledge_graph.sqlite3").exists() or \
        not snapshot(tmp_path / "mate")["triples"]
    # as a replica it would look like a palace that lost every other wing: refused, nothing written
    work = tmp_path / "palace"
    shutil.copytree(palace, work)
    before, bundles = palace_rows(work), sorted(out.iterdir())
    proc = run_cli("sync", work, f"bundle:{out}", "--identity", keys["other"], check=1)
    assert "only wing team" in proc.stderr
    assert palace_rows(work) == before and sorted(out.iterdir()) == bundles
    run_cli("export", "--palace", palace, "--out", tmp_path / "none", "--wing", "no_such_wing", check=10)


def test_encrypted_bundle_directory_as_a_sync_replica(palace, keys, tmp_path):
    work = tmp_path / "palace"
    shutil.copytree(palace, work)
    out = tmp_path / "shared"
    cli_json("export", "--palace", work, "--out", out, "--encrypt-to", keys["me_pub"], "--encrypt-to", keys["other_pub"])
    proc = run_cli("sync", work, f"bundle:{out}", check=1)
    assert "it is encrypted" in proc.stderr
    assert cli_json("sync", work, f"bundle:{out}", "--identity", keys["me"])["converged"]
    edit(work, {"drawer_team_notes_synced": "written after the backup"}, wing="team")
    r = cli_json("sync", work, f"bundle:{out}", "--identity", keys["me"])
    assert r["converged"] and r["moved"]
    newest = sorted(out.glob("palace-*"))[-1]
    assert newest.name.endswith("-incr") and b"written after the backup" not in every_byte(newest)
    # the replica's new bundle is encrypted to the same two keys: the other key restores it too
    run_cli("restore", newest, "--palace", tmp_path / "r", "--identity", keys["other"])
    assert_same(snapshot(work), snapshot(tmp_path / "r"))


def test_keys_are_checked_and_secrets_never_echoed(palace, keys, tmp_path):
    secret = keys["me"].read_text().splitlines()[-1]
    proc = run_cli("export", "--palace", palace, "--out", tmp_path / "b", "--encrypt-to", keys["me"], check=1)
    assert "secret key, not a public key" in proc.stderr and secret not in proc.stderr + proc.stdout
    proc = run_cli("export", "--palace", palace, "--out", tmp_path / "b", "--encrypt-to", "age1notakey", check=1)
    assert "not an age X25519 public key" in proc.stderr
    (tmp_path / "junk.key").write_text("# nothing here\n")
    bundle = Path(cli_json("export", "--palace", palace, "--out", tmp_path / "b2", "--encrypt-to",
                           keys["me_pub"])["bundle"])
    proc = run_cli("restore", bundle, "--palace", tmp_path / "r", "--identity", tmp_path / "junk.key", check=1)
    assert "no identity in it" in proc.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "r").exists()


def test_key_new_writes_a_private_identity_age_reads_and_never_overwrites_one(tmp_path):
    path = tmp_path / "keys" / "backup.key"
    public = run_cli("key", "new", path).stdout.strip()
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(path.parent.stat().st_mode & 0o777) == "0o700"
    ident = pyrage.x25519.Identity.from_str(path.read_text().splitlines()[-1])
    assert str(ident.to_public()) == public and f"# public key: {public}" in path.read_text()
    assert pyrage.decrypt(pyrage.encrypt(b"hello", [pyrage.x25519.Recipient.from_str(public)]), [ident]) == b"hello"
    before = path.read_bytes()
    assert "already exists" in run_cli("key", "new", path, check=1).stderr
    (tmp_path / "elsewhere").write_text("not a key")
    (tmp_path / "link.key").symlink_to(tmp_path / "elsewhere")
    run_cli("key", "new", tmp_path / "link.key", check=1)
    assert path.read_bytes() == before and (tmp_path / "elsewhere").read_text() == "not a key"
    assert "AGE-SECRET-KEY" not in cli_json("key", "new", tmp_path / "second.key", "--json")["public_key"]
