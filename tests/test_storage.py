"""Local storage key validation, atomic writes and URL signing (orchestrator.storage)."""
from __future__ import annotations

import os
import pathlib

import pytest

from orchestrator.errors import InvalidRequest, NotFound
from orchestrator.storage import LocalStorage, UrlSigner, content_type_for

BUCKET = "sdxl_image_fast"
NOW = 1_700_000_000


@pytest.fixture()
def root(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "root"


@pytest.fixture()
def storage(root: pathlib.Path) -> LocalStorage:
    return LocalStorage(root, buckets={BUCKET, "video"})


def snapshot(path: pathlib.Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


HOSTILE = [
    "../x",
    "u/../../etc/passwd",
    "/abs",
    "/u/x",
    "u\\x",
    "u/x\x00",
    "u/x\nname",
    "u/%2e%2e/x",
    "u/%2E%2E/x",
    "%2e%2e%2fetc",
    "u/%2fetc",
    "u/%5cx",
    "u/x%00",
    "u/%252e%252e/x",  # double-encoded
    "u/%ff",  # not valid UTF-8 once decoded
    "u//x",
    "u/./x",
    "u/x/",
    "u/..",
    "u/.hidden",
    "u",
    "",
    "u/" + "a" * 256,
    "u/" + "/".join(["a" * 200] * 6),
]


@pytest.mark.parametrize("key", HOSTILE)
def test_hostile_keys_rejected_and_nothing_written(
    storage: LocalStorage, tmp_path: pathlib.Path, root: pathlib.Path, key: str
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("keep")
    before = snapshot(tmp_path)
    with pytest.raises(InvalidRequest):
        storage.validate_key(BUCKET, key)
    with pytest.raises(InvalidRequest):
        storage.write(BUCKET, key, b"evil", owner="u")
    with pytest.raises(InvalidRequest):
        storage.path_for(BUCKET, key)
    with pytest.raises(InvalidRequest):
        storage.open(BUCKET, key)
    assert snapshot(tmp_path) == before
    assert not root.exists()
    assert (tmp_path / "etc" / "passwd").read_text() == "keep"


def test_unknown_bucket_rejected(storage: LocalStorage, tmp_path: pathlib.Path) -> None:
    before = snapshot(tmp_path)
    for bucket in ("nope", "..", "", "sdxl_image_fast/../x"):
        with pytest.raises(InvalidRequest, match="bucket"):
            storage.write(bucket, "u/x.png", b"data")
    assert snapshot(tmp_path) == before


def test_other_owner_rejected(storage: LocalStorage, tmp_path: pathlib.Path) -> None:
    before = snapshot(tmp_path)
    with pytest.raises(InvalidRequest, match="user"):
        storage.write(BUCKET, "alice/x.png", b"data", owner="bob")
    with pytest.raises(InvalidRequest):
        storage.open(BUCKET, "alice/x.png", owner="bob")
    assert snapshot(tmp_path) == before


def test_error_messages_name_the_problem(storage: LocalStorage) -> None:
    cases = {
        "": "empty",
        "u//x": "empty path segment",
        "u/../x": "'..'",
        "/abs/x": "absolute",
        "u\\x": "backslash",
        "u/x\x00": "control",
        "u/%2e%2e/x": "percent",
        "u": "<user_id>/<file>",
    }
    for key, fragment in cases.items():
        with pytest.raises(InvalidRequest) as info:
            storage.validate_key(BUCKET, key)
        assert fragment in info.value.message, key


def test_valid_keys_accepted(storage: LocalStorage) -> None:
    for key in ("u/x.png", "user-1/sub/dir/file_01.mp4", "u/100%_done.png", "u/naïve.png", "u/a..b.png"):
        assert storage.validate_key(BUCKET, key) == key
    assert storage.validate_key(BUCKET, "u/x.png", owner="u") == "u/x.png"


def test_round_trip(storage: LocalStorage, root: pathlib.Path) -> None:
    assert not root.exists()  # created lazily
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(1000)
    assert storage.write(BUCKET, "u1/img.png", data, owner="u1") == len(data)
    assert (root / BUCKET / "u1" / "img.png").read_bytes() == data
    with storage.open(BUCKET, "u1/img.png", owner="u1") as handle:
        assert handle.read() == data
    assert storage.exists(BUCKET, "u1/img.png")
    assert storage.size(BUCKET, "u1/img.png") == len(data)
    assert storage.path_for(BUCKET, "u1/img.png") == (root / BUCKET / "u1" / "img.png").resolve()


def test_overwrite_is_atomic_and_leaves_no_temp_files(storage: LocalStorage, root: pathlib.Path) -> None:
    storage.write(BUCKET, "u/a/b.bin", b"first")
    storage.write(BUCKET, "u/a/b.bin", b"second, longer")
    storage.write(BUCKET, "u/a/c.bin", b"")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [f"{BUCKET}/u/a/b.bin", f"{BUCKET}/u/a/c.bin"]
    assert storage.open(BUCKET, "u/a/b.bin").read() == b"second, longer"


def test_failed_write_leaves_no_temp_file(
    storage: LocalStorage, root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        storage.write(BUCKET, "u/x.bin", b"data")
    assert [p for p in root.rglob("*") if p.is_file()] == []


def _record_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record each fsync (the path its descriptor names) and each rename, in order; both
    still happen."""
    calls: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src: str, dst: str) -> None:
        calls.append(("rename", str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return calls


@pytest.mark.skipif(not pathlib.Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_write_is_durable_file_then_rename_then_directories(
    storage: LocalStorage, root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data is fsynced before the rename and the directory holding the name after it;
    directories the write created are fsynced in their parents, so a power cut cannot take
    back a file a completion has recorded."""
    calls = _record_syncs(monkeypatch)
    storage.write(BUCKET, "u1/img.png", b"data", owner="u1")
    real = root.resolve()
    target = str(real / BUCKET / "u1" / "img.png")
    kinds = [kind for kind, _ in calls]
    assert kinds == ["fsync", "fsync", "fsync", "fsync", "rename", "fsync"], calls
    created_in = [path for _, path in calls[:3]]
    assert created_in == [str(real.parent), str(real), str(real / BUCKET)]  # root, bucket, user dir
    assert calls[3][1].startswith(str(real / BUCKET / "u1" / ".tmp-"))  # the data, before the rename
    assert calls[4:] == [("rename", target), ("fsync", str(real / BUCKET / "u1"))]

    calls.clear()  # the directories exist now: the file, the rename, its directory
    storage.write(BUCKET, "u1/other.png", b"more", owner="u1")
    assert [kind for kind, _ in calls] == ["fsync", "rename", "fsync"]
    assert calls[2] == ("fsync", str(real / BUCKET / "u1"))


def test_missing_objects(storage: LocalStorage) -> None:
    assert not storage.exists(BUCKET, "u/none.png")
    with pytest.raises(NotFound):
        storage.open(BUCKET, "u/none.png")
    with pytest.raises(NotFound):
        storage.size(BUCKET, "u/none.png")
    storage.write(BUCKET, "u/dir/x.png", b"x")
    with pytest.raises(NotFound):
        storage.open(BUCKET, "u/dir")  # a directory is not an object
    assert not storage.exists(BUCKET, "u/dir")


def test_symlink_escape_rejected(storage: LocalStorage, tmp_path: pathlib.Path, root: pathlib.Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    user_dir = root / BUCKET / "u"
    user_dir.mkdir(parents=True)
    (user_dir / "link").symlink_to(outside, target_is_directory=True)
    (root / BUCKET / "v").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    with pytest.raises(InvalidRequest):
        storage.open(BUCKET, "u/link/secret.txt")
    with pytest.raises(InvalidRequest):
        storage.write(BUCKET, "u/link/new.txt", b"x")
    with pytest.raises(InvalidRequest):
        storage.write(BUCKET, "v/new.txt", b"x")
    assert snapshot(outside) == before


def test_symlink_to_other_user_rejected(storage: LocalStorage, root: pathlib.Path) -> None:
    storage.write(BUCKET, "alice/x.png", b"alice")
    (root / BUCKET / "mallory").mkdir()
    (root / BUCKET / "mallory" / "x.png").symlink_to(root / BUCKET / "alice" / "x.png")
    with pytest.raises(InvalidRequest):
        storage.open(BUCKET, "mallory/x.png", owner="mallory")


def test_linked_user_directory_rejected(storage: LocalStorage, root: pathlib.Path) -> None:
    """A user directory that is a link to another user's, inside the same bucket: refused
    both ways (reading the other's files, writing among them)."""
    storage.write(BUCKET, "alice/x.png", b"alice")
    (root / BUCKET / "mallory").symlink_to(root / BUCKET / "alice", target_is_directory=True)
    with pytest.raises(InvalidRequest):
        storage.open(BUCKET, "mallory/x.png", owner="mallory")
    with pytest.raises(InvalidRequest):
        storage.write(BUCKET, "mallory/y.png", b"mallory", owner="mallory")
    assert sorted(p.name for p in (root / BUCKET / "alice").iterdir()) == ["x.png"]


def test_root_may_be_a_link(tmp_path: pathlib.Path) -> None:
    """The root itself may be a link (to a volume): objects are written under its target."""
    volume = tmp_path / "volume"
    volume.mkdir()
    (tmp_path / "storage").symlink_to(volume, target_is_directory=True)
    linked = LocalStorage(tmp_path / "storage", buckets={BUCKET})
    linked.write(BUCKET, "u/x.png", b"x")
    assert (volume / BUCKET / "u" / "x.png").read_bytes() == b"x"
    with linked.open(BUCKET, "u/x.png") as f:
        assert f.read() == b"x"


def test_bad_bucket_config_rejected(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError):
        LocalStorage(tmp_path, buckets={"../x"})


# ---------------------------------------------------------------- UrlSigner


def test_signer_valid() -> None:
    signer = UrlSigner(b"k" * 32, ttl_seconds=60)
    expires, sig = signer.sign(BUCKET, "u/x.png", now=NOW)
    assert expires == NOW + 60
    signer.verify(BUCKET, "u/x.png", expires, sig, now=NOW)
    signer.verify(BUCKET, "u/x.png", str(expires), sig, now=NOW + 60)
    signer.verify(BUCKET, "u/x.png", str(expires), sig.upper(), now=NOW)


@pytest.mark.parametrize(
    "bucket, key, delta_expires, mutate",
    [
        (BUCKET, "u/y.png", 0, None),  # tampered key
        ("video", "u/x.png", 0, None),  # tampered bucket
        (BUCKET, "u/x.png", 3600, None),  # extended expiry
        (BUCKET, "u/x.png", 0, "flip"),  # tampered signature
        (BUCKET, "u/x.png", 0, "short"),
        (BUCKET, "u/x.png", 0, "nonhex"),
    ],
)
def test_signer_rejects_tampering(bucket: str, key: str, delta_expires: int, mutate: str | None) -> None:
    signer = UrlSigner(b"k" * 32)
    expires, sig = signer.sign(BUCKET, "u/x.png", now=NOW)
    if mutate == "flip":
        sig = ("0" if sig[0] != "0" else "1") + sig[1:]
    elif mutate == "short":
        sig = sig[:-2]
    elif mutate == "nonhex":
        sig = "é" * 64
    with pytest.raises(NotFound):
        signer.verify(bucket, key, expires + delta_expires, sig, now=NOW)


def test_signer_expired() -> None:
    signer = UrlSigner(b"k" * 32, ttl_seconds=60)
    expires, sig = signer.sign(BUCKET, "u/x.png", now=NOW)
    with pytest.raises(NotFound):
        signer.verify(BUCKET, "u/x.png", expires, sig, now=NOW + 61)


@pytest.mark.parametrize("expires", ["", "abc", "-5", "1e9", "9" * 40, None, True, 1.5])
def test_signer_malformed_expiry_is_not_found(expires: object) -> None:
    signer = UrlSigner(b"k" * 32)
    _, sig = signer.sign(BUCKET, "u/x.png", now=NOW)
    with pytest.raises(NotFound):
        signer.verify(BUCKET, "u/x.png", expires, sig, now=NOW)  # type: ignore[arg-type]


def test_signer_other_key_rejected() -> None:
    expires, sig = UrlSigner(b"a" * 32).sign(BUCKET, "u/x.png", now=NOW)
    with pytest.raises(NotFound):
        UrlSigner(b"b" * 32).verify(BUCKET, "u/x.png", expires, sig, now=NOW)


def test_content_type_for() -> None:
    assert content_type_for("a.png") == "image/png"
    assert content_type_for("A.PNG") == "image/png"
    assert content_type_for("u/clip.mp4") == "video/mp4"
    assert content_type_for("x.jpg") == "image/jpeg"
    assert content_type_for("x.jpeg") == "image/jpeg"
    assert content_type_for("x.webp") == "image/webp"
    assert content_type_for("x.html") == "application/octet-stream"
    assert content_type_for("noext") == "application/octet-stream"
