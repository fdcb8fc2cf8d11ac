"""age encryption of bundle files (``pyrage``; no cryptography of our own).

A bundle is encrypted file by file, streaming: Parquet is written into a pipe and ``pyrage``
encrypts it from the other end, so no plaintext of an encrypted bundle touches the bundle's disk.

- To public keys (``age1...``): every file is encrypted to every recipient. ``age -d -i KEY FILE``
  decrypts any of them with the standard tool.
- With a passphrase: the bundle gets its own fresh X25519 key, stored passphrase-encrypted (scrypt)
  as ``key.age``, and its files are encrypted to that key (and to any recipients): one scrypt per
  bundle instead of one per file.

``Sealer`` encrypts (what export and a bundle replica's commit need: public keys, a passphrase);
``Keys`` decrypts (``--identity`` files, a passphrase).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import PalaceEtlError
from .ids import HashingWriter

KEY_FILE = "key.age"  # a passphrase bundle's own identity, passphrase-encrypted
MAX_KEY_FILE = 1 << 20


class CryptError(PalaceEtlError):
    """A key is missing, malformed or does not open a bundle."""


class Tampered(CryptError):
    """A ciphertext the key opens fails age's authentication: changed after it was written."""


def _pyrage():
    try:
        import pyrage
    except ImportError:  # pragma: no cover - a dependency; only a broken install lacks it
        raise CryptError("encrypted bundles need the pyrage package", hint="pip install pyrage") from None
    return pyrage


def _small_text(path: Path, what: str) -> str:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_KEY_FILE:
            raise CryptError(f"read {what} {path}: larger than any key file")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CryptError(f"read {what} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CryptError(f"read {what} {path}: {exc}") from None


def read_passphrase(path: Path) -> str:
    """The passphrase in ``path``: its first line, without the line ending."""
    text = _small_text(path, "--passphrase-file")
    line = text.splitlines()[0] if text else ""
    if not line:
        raise CryptError(f"read --passphrase-file {path}: the first line is empty")
    return line


def _recipient(text: str, where: str):
    try:
        return _pyrage().x25519.Recipient.from_str(text)
    except Exception:
        if text.upper().startswith("AGE-SECRET-KEY-"):  # never echo a secret key into a log
            raise CryptError(f"{where}: that is a secret key, not a public key",
                             hint="give its public key (age1..., as `age-keygen -y` prints it)") from None
        raise CryptError(f"{where}: not an age X25519 public key (age1...)") from None


def new_identity(path: Path) -> str:
    """Write a new age X25519 identity to ``path`` (0600, in the format ``age-keygen`` writes; never
    over an existing file or through a symlink) and return its public key."""
    path = Path(path).expanduser()
    ident = _pyrage().x25519.Identity.generate()
    public = str(ident.to_public())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise CryptError(f"key new {path}: already exists (a key is never overwritten)") from None
    except OSError as exc:
        raise CryptError(f"key new {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"# created: palace-etl key new\n# public key: {public}\n{ident}\n")
        f.flush()
        os.fsync(f.fileno())
    return public


def parse_recipients(values: list[str]) -> list[str]:
    """``--encrypt-to`` values: each an ``age1...`` public key or a file of them (one per line,
    ``#`` comments), as ``age -R``. Returns the keys, checked, in a stable order."""
    keys: list[str] = []
    for value in values:
        if value.startswith("age1"):
            _recipient(value, "--encrypt-to")
            keys.append(value)
            continue
        for n, line in enumerate(_small_text(Path(value), "--encrypt-to file").splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                _recipient(line, f"{value}:{n}")
                keys.append(line)
    if values and not keys:
        raise CryptError(f"--encrypt-to {values[0]}: no public key in it")
    return sorted(set(keys))


@dataclass
class Sealer:
    """What a new encrypted bundle is encrypted to."""

    recipients: list[str] = field(default_factory=list)
    passphrase: str | None = None

    def __post_init__(self):
        if not self.recipients and not self.passphrase:
            raise CryptError("encrypt a bundle: give --encrypt-to RECIPIENT or --passphrase-file FILE")

    def describe(self) -> dict:
        """What the (encrypted) inner manifest records, so a replica writing the next bundle of the
        chain encrypts it to the same keys."""
        return {"scheme": "age", "recipients": list(self.recipients), "passphrase": self.passphrase is not None}

    @contextlib.contextmanager
    def keyed(self, bundle_dir: Path) -> Iterator["BundleSeal"]:
        """The recipients for one bundle's files; with a passphrase, writes its ``key.age``."""
        pyrage = _pyrage()
        recipients = [pyrage.x25519.Recipient.from_str(r) for r in self.recipients]
        if self.passphrase is not None:
            own = pyrage.x25519.Identity.generate()
            (Path(bundle_dir) / KEY_FILE).write_bytes(pyrage.passphrase.encrypt(str(own).encode(), self.passphrase))
            os.chmod(Path(bundle_dir) / KEY_FILE, 0o600)
            recipients.append(own.to_public())
        yield BundleSeal(recipients)


@dataclass
class BundleSeal:
    recipients: list

    @contextlib.contextmanager
    def writer(self, path: Path) -> Iterator[HashingWriter]:
        """A stream whose bytes land encrypted in ``path`` (0600); ``.sha`` is the plaintext's sha256."""
        r, w = os.pipe()
        failure: list[BaseException] = []
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out, \
                os.fdopen(r, "rb") as rf:
            def pump():
                try:
                    _pyrage().encrypt_io(rf, out, self.recipients)
                except BaseException as exc:  # reported in the writing thread
                    failure.append(exc)
                    rf.read()  # drain, so the writer never blocks on a dead reader

            t = threading.Thread(target=pump, name="age-encrypt", daemon=True)
            t.start()
            wf = os.fdopen(w, "wb")
            try:
                sink = HashingWriter(wf)
                yield sink
            finally:
                wf.close()
                t.join()
        if failure:
            raise CryptError(f"encrypt {path}: {failure[0]}")


@dataclass
class Keys:
    """What opens encrypted bundles: age identities (``--identity``) and/or a passphrase."""

    identities: list = field(default_factory=list)
    passphrase: str | None = None
    sources: list[str] = field(default_factory=list)  # the files they came from, for messages
    _opened: dict = field(default_factory=dict, repr=False)  # sha256 of a key.age -> its identity (one scrypt each)

    @classmethod
    def load(cls, identity_files: list[Path] | None = None, passphrase_file: Path | None = None) -> "Keys | None":
        """From ``--identity FILE`` (age identity files: ``AGE-SECRET-KEY-1...`` lines, ``#``
        comments) and ``--passphrase-file``; None when neither was given."""
        if not identity_files and passphrase_file is None:
            return None
        pyrage = _pyrage()
        idents = []
        for path in identity_files or []:
            found = 0
            for n, line in enumerate(_small_text(Path(path), "--identity").splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                try:
                    idents.append(pyrage.x25519.Identity.from_str(line))
                except Exception:
                    raise CryptError(f"{path}:{n}: not an age X25519 identity (AGE-SECRET-KEY-1...)") from None
                found += 1
            if not found:
                raise CryptError(f"--identity {path}: no identity in it")
        sources = [str(p) for p in identity_files or []] + ([str(passphrase_file)] if passphrase_file else [])
        return cls(idents, read_passphrase(passphrase_file) if passphrase_file else None, sources)

    def for_bundle(self, bundle: Path) -> list:
        """The identities that may open ``bundle``'s files (its own key, when the passphrase opens it)."""
        idents = list(self.identities)
        key = Path(bundle) / KEY_FILE
        if key.is_file() and not key.is_symlink():
            if self.passphrase is None:
                if not idents:
                    raise CryptError(f"open bundle {bundle}: it is passphrase-encrypted",
                                     hint="pass --passphrase-file FILE")
                return idents
            pyrage = _pyrage()
            sealed = key.read_bytes()[:MAX_KEY_FILE]
            digest = hashlib.sha256(sealed).hexdigest()
            try:
                if digest not in self._opened:
                    own = pyrage.passphrase.decrypt(sealed, self.passphrase)
                    self._opened[digest] = pyrage.x25519.Identity.from_str(own.decode())
                idents.append(self._opened[digest])
            except Exception:
                if not idents:
                    raise CryptError(f"open bundle {bundle}: the passphrase in {self.sources[-1]} does not open it",
                                     hint="check the --passphrase-file") from None
        return idents

    def decrypt(self, src: Path, dst: Path, identities: list, bundle: Path) -> None:
        """Decrypt ``src`` into the new file ``dst`` (0600); a key that does not fit is named."""
        try:
            with open(src, "rb") as f, open(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as g:
                _pyrage().decrypt_io(f, g, identities)
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno is not None:  # our disk, not the ciphertext
                raise
            if "No matching keys" in str(exc):
                raise CryptError(f"open bundle {bundle}: {src.name} does not decrypt with {', '.join(self.sources)}",
                                 hint="the bundle was encrypted to another key") from None
            raise Tampered(f"open bundle {bundle}: {src.name} fails to decrypt ({exc}): it was changed after it "
                             "was written", hint="the file is damaged or tampered with: restore from another "
                             "bundle") from None
