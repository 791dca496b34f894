"""Sealed storage of the emulated PSP's guest contexts: they survive a daemon restart.

The PSP is hardware: its guest contexts (handle, policy, VEK) live in the secure processor,
not in the hypervisor, so a crashed and restarted VMM finds its guests' contexts — and keys —
still there. The emulation keeps every RUNNING context in ``state_dir/psp/guest-HANDLE.ctx``,
sealed with AES-256-GCM under a platform sealing key (``psp/sealing.key``, 0600, created on
first use), the way an SEV-SNP PSP seals its state with a chip-unique key. The handle is
bound into the GCM associated data, so a renamed or swapped file fails to unseal; a tampered
or truncated one is an error that names the file — never a silently forgotten guest.

Writes are atomic and durable: a temporary file in the same directory, ``fsync``, ``rename``,
``fsync`` of the directory. The next free handle is sealed the same way (``psp/next-handle``),
so a handle number is never handed out twice, even across restarts: the journal refers to
guests by handle, and a reused number would make a stale record name another guest's key.

Only contexts at rest are stored. Session state (an open SEND or RECEIVE) is not: a context
that was mid-SEND comes back RUNNING (as after SEND_CANCEL); one still in RECEIVE never was
RUNNING and is gone (its partial guest is removed by the host).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from migd.errors import IntegrityError
from migd.fileio import TEMP_SUFFIX, atomic_write, fsync_dir  # noqa: F401  (re-exported)
from migd.platform.memory import VEK_SIZE

log = logging.getLogger(__name__)

SEALING_KEY: Final = "sealing.key"
NEXT_HANDLE: Final = "next-handle"
SEALING_KEY_SIZE: Final = 32  # AES-256-GCM
_MAGIC: Final = b"MIGDPSP1"
_NONCE_SIZE: Final = 12
_TAG_SIZE: Final = 16
_CONTEXT: Final = struct.Struct(f"<II{VEK_SIZE}s")  # handle, policy, VEK
_COUNTER: Final = struct.Struct("<I")
_CONTEXT_FILE: Final = re.compile(r"^guest-([0-9]{1,10})\.ctx$")
_TEMP_SUFFIX: Final = TEMP_SUFFIX
MAX_HANDLE: Final = 0xFFFFFFFF


class SealedStoreError(IntegrityError):
    """A sealed PSP file (context, counter or sealing key) is missing, garbled or tampered with."""


@dataclass(frozen=True)
class StoredContext:
    """What survives a restart of one guest context: the rest is session state."""

    handle: int
    policy: int
    vek: bytes

    def __post_init__(self) -> None:
        if not 1 <= self.handle <= MAX_HANDLE:
            raise ValueError(f"handle must be in 1..{MAX_HANDLE}, got {self.handle}")
        if not 0 <= self.policy <= 0xFFFFFFFF:
            raise ValueError(f"policy must be a u32, got {self.policy}")
        if len(self.vek) != VEK_SIZE:
            raise ValueError(f"a VEK is {VEK_SIZE} bytes, got {len(self.vek)}")


def context_file_name(handle: int) -> str:
    """The file name of a guest context (``guest-HANDLE.ctx``)."""
    return f"guest-{handle}.ctx"


def _aad(label: bytes, handle: int) -> bytes:
    # The file's identity is authenticated: a context renamed to another handle's file name,
    # or the counter file swapped for a context, fails to unseal.
    return _MAGIC + label + _COUNTER.pack(handle)


class ContextStore:
    """The sealed files under one PSP directory (``state_dir/psp``)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._key_path = self.directory / SEALING_KEY
        self._aead: AESGCM | None = None

    # ------------------------------------------------------------------ sealing key

    def _read_key(self) -> bytes | None:
        try:
            fd = os.open(self._key_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SealedStoreError(f"cannot open the PSP sealing key {self._key_path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077:
                raise SealedStoreError(
                    f"PSP sealing key {self._key_path} must be a regular file of mode 0600, "
                    f"got {stat.filemode(info.st_mode)}"
                )
            key = f.read(SEALING_KEY_SIZE + 1)
        if len(key) != SEALING_KEY_SIZE:
            raise SealedStoreError(
                f"PSP sealing key {self._key_path} must hold {SEALING_KEY_SIZE} bytes, got {len(key)}"
            )
        return key

    def _sealer(self) -> AESGCM:
        """The AEAD under the sealing key, creating the key (0600, exclusive) on first use."""
        if self._aead is None:
            key = self._read_key()
            if key is None:
                key = os.urandom(SEALING_KEY_SIZE)
                fd = os.open(self._key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(key)
                    f.flush()
                    os.fsync(f.fileno())
                fsync_dir(self.directory)
                log.info("created PSP sealing key path=%s", self._key_path)
            self._aead = AESGCM(key)
        return self._aead

    def _seal(self, label: bytes, handle: int, plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE_SIZE)
        return _MAGIC + nonce + self._sealer().encrypt(nonce, plaintext, _aad(label, handle))

    def _unseal(self, path: Path, label: bytes, handle: int, blob: bytes, size: int) -> bytes:
        expected = len(_MAGIC) + _NONCE_SIZE + size + _TAG_SIZE
        if len(blob) != expected or not blob.startswith(_MAGIC):
            raise SealedStoreError(
                f"sealed PSP file {path} is garbled: expected {expected} bytes starting with {_MAGIC!r}, "
                f"got {len(blob)} bytes starting with {blob[:len(_MAGIC)]!r}"
            )
        nonce = blob[len(_MAGIC) : len(_MAGIC) + _NONCE_SIZE]
        try:
            return self._sealer().decrypt(nonce, blob[len(_MAGIC) + _NONCE_SIZE :], _aad(label, handle))
        except InvalidTag:
            raise SealedStoreError(
                f"sealed PSP file {path} does not authenticate under {self._key_path}: it was tampered with, "
                f"renamed, or sealed under another key"
            ) from None

    # ------------------------------------------------------------------ contexts

    def save(self, context: StoredContext) -> None:
        """Seal one context to ``guest-HANDLE.ctx`` (replacing an older copy atomically)."""
        plaintext = _CONTEXT.pack(context.handle, context.policy, context.vek)
        atomic_write(self.directory / context_file_name(context.handle), self._seal(b"ctx", context.handle, plaintext))

    def remove(self, handle: int) -> None:
        """Forget one context (durably); a missing file is fine."""
        try:
            (self.directory / context_file_name(handle)).unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.directory)

    def save_next_handle(self, next_handle: int) -> None:
        """Record the next handle LAUNCH_START/RECEIVE_START will hand out."""
        if not 1 <= next_handle <= MAX_HANDLE + 1:
            raise ValueError(f"next handle must be in 1..{MAX_HANDLE + 1}, got {next_handle}")
        atomic_write(self.directory / NEXT_HANDLE, self._seal(b"next", 0, struct.pack("<Q", next_handle)))

    def load(self) -> tuple[list[StoredContext], int]:
        """Every stored context (by handle) and the next free handle (1 on a new platform).

        Raises :class:`SealedStoreError`, naming the file, for anything that does not unseal.
        Leftover temporary files of an interrupted write are removed (the rename never happened,
        so the previous version, if any, is intact).
        """
        files: dict[int, Path] = {}
        counter_path: Path | None = None
        for path in sorted(self.directory.iterdir()):
            name = path.name
            if name == SEALING_KEY:
                continue
            if name == NEXT_HANDLE:
                counter_path = path
            elif name.startswith(".") and name.endswith(_TEMP_SUFFIX):
                log.warning("removing interrupted PSP write path=%s", path)
                path.unlink(missing_ok=True)
            elif match := _CONTEXT_FILE.match(name):
                files[int(match.group(1))] = path
            else:
                log.warning("ignoring unexpected file in the PSP store path=%s", path)
        if (files or counter_path is not None) and self._read_key() is None:
            raise SealedStoreError(
                f"PSP sealing key {self._key_path} is missing, but {self.directory} holds sealed files "
                f"({len(files)} guest contexts): they cannot be opened without it"
            )
        contexts = [self._load_context(handle, path) for handle, path in sorted(files.items())]
        next_handle = 1
        if counter_path is not None:
            blob = self._unseal(counter_path, b"next", 0, _read(counter_path), 8)
            next_handle = struct.unpack("<Q", blob)[0]
        if contexts:
            next_handle = max(next_handle, contexts[-1].handle + 1)
        return contexts, next_handle

    def _load_context(self, handle: int, path: Path) -> StoredContext:
        plaintext = self._unseal(path, b"ctx", handle, _read(path), _CONTEXT.size)
        sealed_handle, policy, vek = _CONTEXT.unpack(plaintext)
        if sealed_handle != handle:  # unreachable unless the AAD check is broken: belt and braces
            raise SealedStoreError(f"sealed PSP file {path} holds handle {sealed_handle}, its name says {handle}")
        try:
            return StoredContext(handle, policy, vek)
        except ValueError as exc:
            raise SealedStoreError(f"sealed PSP file {path}: {exc}") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SealedStoreError(f"cannot read sealed PSP file {path}: {exc.strerror}") from None


__all__ = ["ContextStore", "SealedStoreError", "StoredContext", "atomic_write", "context_file_name", "fsync_dir"]
