"""Local file storage for generated images/videos, plus signed download URLs.

Objects live at ``<root>/<bucket>/<key>`` with ``key = "<user_id>/<file>"``
and ``bucket`` one of the configured job types.  Keys arrive from URLs and
request bodies, i.e. from untrusted users, so :meth:`LocalStorage.validate_key`
is deliberately strict: it *rejects* anything non-canonical instead of trying
to clean it up, because every "normalisation" is a chance for two layers to
disagree about which file is meant (the classic path-traversal bug).
:meth:`LocalStorage.path_for` then re-checks the fully resolved path against
the root, so a symlink planted inside the tree still cannot escape it.

Download links must work in ``<img src>`` where no Authorization header is
sent, hence :class:`UrlSigner`: an HMAC over bucket, key and expiry.  A bad or
expired link raises :class:`NotFound` rather than 401 so probing links reveals
nothing about which files exist.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import re
import secrets
import time
import unicodedata
import urllib.parse
from collections.abc import Collection
from typing import BinaryIO

from orchestrator.errors import Conflict, InvalidRequest, NotFound

__all__ = [
    "MAX_KEY_LENGTH",
    "MAX_SEGMENT_LENGTH",
    "CONTENT_TYPES",
    "LocalStorage",
    "UrlSigner",
    "content_type_for",
]

#: Longest key accepted, in characters.
MAX_KEY_LENGTH = 1024
#: Longest single path segment; 255 is the common filesystem name limit.
MAX_SEGMENT_LENGTH = 255

#: Percent-escapes that decode to ".", "/", "\\" or NUL: never legitimate in
#: a key and the usual way to smuggle traversal past a naive check.
_FORBIDDEN_ESCAPES = ("%2e", "%2f", "%5c", "%00")

#: Bucket names come from configuration; they must be one plain segment.
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

_TEMP_PREFIX = ".tmp-"


class LocalStorage:
    """Files on local disk under one root, addressed by (bucket, key).

    The root is created lazily on the first write so constructing the storage
    (e.g. at import/config time) has no side effects on disk.
    """

    def __init__(self, root: str | os.PathLike[str], *, buckets: Collection[str]) -> None:
        bucket_set = frozenset(buckets)
        for bucket in bucket_set:
            if not isinstance(bucket, str) or not _BUCKET_RE.fullmatch(bucket):
                raise ValueError(f"invalid storage bucket name: {bucket!r}")
        self.root = pathlib.Path(root)
        self.buckets: frozenset[str] = bucket_set
        self._root_resolved: str | None = None

    # ------------------------------------------------------------------
    # Validation
    # ------------------------------------------------------------------

    def validate_key(self, bucket: str, key: str, *, owner: str | None = None) -> str:
        """Return ``key`` if it is a safe, canonical object key, else raise.

        Raises :class:`InvalidRequest` naming the problem.  The returned key
        is the input unchanged: anything that would need normalising is
        rejected, so the key a caller signs, stores and serves is one string.
        ``owner`` pins the first segment to the requesting user's id.
        """
        if bucket not in self.buckets:
            raise InvalidRequest("unknown storage bucket", details={"bucket": str(bucket)[:64]})
        if not isinstance(key, str):
            raise InvalidRequest("storage key must be a string")
        _check_key_text(key)

        # Percent-encoding: reject escapes of traversal characters outright,
        # then make sure that no level of decoding yields an invalid key (a
        # later layer, or a proxy, might decode once more).
        lowered = key.lower()
        if any(escape in lowered for escape in _FORBIDDEN_ESCAPES):
            raise InvalidRequest("storage key contains a forbidden percent-encoded character")
        decoded = key
        while True:  # each changing pass shortens the string, so this ends
            try:
                unquoted = urllib.parse.unquote(decoded, errors="strict")
            except UnicodeDecodeError:
                raise InvalidRequest("storage key contains invalid percent-encoding") from None
            if unquoted == decoded:
                break
            try:
                _check_key_text(unquoted)
            except InvalidRequest as exc:
                raise InvalidRequest(
                    f"storage key is invalid once percent-decoded: {exc.message}"
                ) from None
            decoded = unquoted

        segments = key.split("/")
        if len(segments) < 2:
            raise InvalidRequest("storage key must be '<user_id>/<file>'")
        if owner is not None and segments[0] != owner:
            raise InvalidRequest("storage key does not belong to the requesting user")
        return key

    def path_for(self, bucket: str, key: str, *, owner: str | None = None) -> pathlib.Path:
        """Validated filesystem path of an object.

        Defence in depth: besides the textual checks, the path is resolved
        (following any symlinks) and must be exactly ``<root>/<bucket>/<key>``
        under the resolved root: a symlink planted at any level below the root
        (bucket, user directory or file) is refused, wherever it leads, so it
        cannot lead outside the root, nor from one user's (or bucket's) files
        to another's. One resolution of the whole path, not one per level.
        """
        key = self.validate_key(bucket, key, owner=owner)
        expected = os.path.join(self._root_real(), bucket, key)
        candidate = os.path.realpath(expected)
        if candidate != expected:
            raise InvalidRequest("storage key resolves outside the storage root")
        return pathlib.Path(candidate)

    def _root_real(self) -> str:
        """The root, resolved (it may itself be a link, to a volume, say): once it exists,
        resolved once; until then, on every call."""
        real = self._root_resolved
        if real is None:
            real = os.path.realpath(self.root)
            if os.path.isdir(real):
                self._root_resolved = real
        return real

    # ------------------------------------------------------------------
    # Object operations
    # ------------------------------------------------------------------

    def write(self, bucket: str, key: str, data: bytes, *, owner: str | None = None) -> int:
        """Store ``data`` atomically and return its size in bytes.

        Written to a temporary file in the destination directory and moved
        into place with :func:`os.replace`, so readers see either the old
        object or the complete new one, never a partial file.

        Durable when it returns: the file's data is fsynced before the rename,
        and the directory after it (and the parent of each directory this call
        created), so a power cut cannot take back a file that a job's completion
        already recorded: the rename itself lives in the directory.
        """
        path = self.path_for(bucket, key, owner=owner)
        payload = bytes(data)
        if not path.parent.is_dir():  # the resolved parent: no symlink left in it
            created = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise Conflict("storage key conflicts with an existing object") from None
            for directory in reversed(created):  # outermost first: each entry in its parent
                _fsync_directory(directory.parent)
            # Re-check after mkdir: a directory swapped for a symlink in between
            # would otherwise redirect the write. (When the directory already
            # existed nothing was created: the first check stands, as the second
            # would have until the open below.)
            path = self.path_for(bucket, key, owner=owner)
        if path.is_dir():
            raise Conflict("storage key conflicts with an existing object")

        temp = path.parent / f"{_TEMP_PREFIX}{secrets.token_hex(16)}"
        # O_EXCL: never follow or reuse an existing name; 0o666 lets the
        # process umask decide the final permissions, like a normal open().
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = os.open(temp, flags, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        except BaseException:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            raise
        _fsync_directory(path.parent)
        return len(payload)

    def open(self, bucket: str, key: str, *, owner: str | None = None) -> BinaryIO:
        """Open an object for binary reading; :class:`NotFound` if absent."""
        path = self.path_for(bucket, key, owner=owner)
        try:
            return open(path, "rb")  # noqa: SIM115 - caller owns the handle
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound("file not found") from None

    def exists(self, bucket: str, key: str) -> bool:
        """True if the object exists as a regular file (key is validated)."""
        return self.path_for(bucket, key).is_file()

    def size(self, bucket: str, key: str) -> int:
        """Size in bytes; :class:`NotFound` if absent."""
        path = self.path_for(bucket, key)
        if not path.is_file():
            raise NotFound("file not found")
        return path.stat().st_size


def _fsync_directory(directory: pathlib.Path) -> None:
    """Make the entries of ``directory`` (a rename, a new subdirectory) durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_key_text(key: str) -> None:
    """Textual key rules shared by the raw and the percent-decoded forms."""
    if key == "":
        raise InvalidRequest("storage key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidRequest(f"storage key is longer than {MAX_KEY_LENGTH} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in key):
        raise InvalidRequest("storage key contains NUL or control characters")
    # Lone surrogates cannot be encoded (for the filesystem or the database);
    # U+FFFD is what invalid UTF-8 in a URL decodes to, so two different raw
    # keys would name one object.
    if "\ufffd" in key or any("\ud800" <= ch <= "\udfff" for ch in key):
        raise InvalidRequest("storage key is not valid UTF-8")
    if "\\" in key:
        raise InvalidRequest("storage key contains a backslash")
    if key.startswith("/"):
        raise InvalidRequest("storage key must be relative, not an absolute path")
    for segment in key.split("/"):
        if segment == "":
            raise InvalidRequest("storage key contains an empty path segment")
        if segment in (".", ".."):
            raise InvalidRequest("storage key contains a '.' or '..' segment")
        if segment.startswith("."):
            # Also keeps user keys disjoint from our own temp files.
            raise InvalidRequest("storage key segments must not start with '.'")
        if len(segment) > MAX_SEGMENT_LENGTH:
            raise InvalidRequest(
                f"storage key segment is longer than {MAX_SEGMENT_LENGTH} characters"
            )


class UrlSigner:
    """Expiring HMAC-SHA256 signatures for download URLs.

    Signed message: ``f"{bucket}/{key}:{expires}"``; signature: lowercase
    hex.  Hex needs no URL escaping and has one canonical spelling.
    """

    def __init__(self, key: bytes, *, ttl_seconds: int = 3600) -> None:
        if not key:
            raise ValueError("URL signing key must not be empty")
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self._key = bytes(key)
        self.ttl_seconds = int(ttl_seconds)

    def _signature(self, bucket: str, key: str, expires: int) -> str:
        message = f"{bucket}/{key}:{expires}".encode("utf-8", "surrogatepass")
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def sign(self, bucket: str, key: str, *, now: float | None = None) -> tuple[int, str]:
        """Return ``(expires_unix, signature)`` for a link valid for the TTL."""
        current = time.time() if now is None else now
        expires = int(current) + self.ttl_seconds
        return expires, self._signature(bucket, key, expires)

    def verify(
        self,
        bucket: str,
        key: str,
        expires: str | int,
        signature: str,
        *,
        now: float | None = None,
    ) -> None:
        """Accept a link or raise :class:`NotFound`.

        NotFound (not 401) on purpose: an invalid, tampered or expired link is
        indistinguishable from a missing file to the client.  Malformed
        parameters take the same path and never raise anything else.
        """
        not_found = NotFound("file not found")
        if isinstance(expires, bool):
            raise not_found
        if isinstance(expires, int):
            expires_at = expires
        elif isinstance(expires, str) and re.fullmatch(r"[0-9]{1,12}", expires):
            expires_at = int(expires)
        else:
            raise not_found
        if not isinstance(signature, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", signature):
            raise not_found
        try:
            expected = self._signature(bucket, key, expires_at)
        except Exception:
            raise not_found from None
        valid = hmac.compare_digest(expected, signature.lower())
        current = time.time() if now is None else now
        if not valid or current > expires_at:
            raise not_found


#: Extension → MIME type for files we generate; anything else is opaque.
CONTENT_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "mp4": "video/mp4",
    "webm": "video/webm",
}


def content_type_for(name: str) -> str:
    """MIME type from the file extension.

    A fixed table rather than :mod:`mimetypes`, whose answers depend on the
    host's configuration; unknown types fall back to a download-only type so
    nothing user-named is ever served as HTML.
    """
    _, dot, extension = name.rpartition(".")
    if not dot:
        return "application/octet-stream"
    return CONTENT_TYPES.get(extension.lower(), "application/octet-stream")
