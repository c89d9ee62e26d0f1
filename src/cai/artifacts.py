"""Stage artifacts on disk: one folder per (stage, key), finished only when its manifest exists.

Layout under `paths.artifact_dir`:

    <stage>/<key>/            finished artifact: files + manifest.json (written last)
    <stage>/<key>.partial/    work in progress; a rerun resumes from what it holds
    <stage>/<key>.lock        held while one process builds the artifact

A stage writes into the `.partial` folder; the runner checksums its files, writes the manifest
and renames the folder into place in one step, so no reader ever sees a half-written artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from cai.errors import ArtifactError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as error:
        raise ArtifactError(
            f"Cannot write {path}: {error}. Check the folder exists, is writable "
            f"and has free space (or point paths.* elsewhere)."
        ) from error
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        raise ArtifactError(
            f"Writing {path} failed: {error}. Nothing was replaced; free space or "
            f"fix permissions and run again."
        ) from error
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_payload(payload: Any, length: int = 16) -> str:
    """Stable short hash of a JSON-able value (dict keys sorted)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# ---------------------------------------------------------------------------------------------
# Resumable parts: a long stage writes each finished batch as its own file


class PartWriter:
    """Finished batches of records, one atomically written JSONL file each.

    A stage asks `done(i)` before computing batch i and `write(i, records)` after; killed and
    rerun, it skips the finished batches and never sees a half-written one.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        return self.folder / f"part-{index:06d}.jsonl"

    def done(self, index: int) -> bool:
        """Whether batch `index` is finished. A part that does not parse (damaged on disk
        after it was written) is set aside with a warning and done again."""
        path = self._path(index)
        if not path.is_file():
            return False
        try:
            read_jsonl(path)
        except (ValueError, UnicodeDecodeError) as error:
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            log.warning(
                "Part %s does not parse (%s): set aside as %s and computed again.",
                path,
                error,
                aside.name,
            )
            return False
        return True

    def write(self, index: int, records: list[dict]) -> None:
        write_jsonl_atomic(self._path(index), records)

    def read_all(self) -> list[dict]:
        return [r for p in sorted(self.folder.glob("part-*.jsonl")) for r in read_jsonl(p)]


# ---------------------------------------------------------------------------------------------
# Artifacts and the store


@dataclass(frozen=True)
class Artifact:
    """A finished artifact: its folder and manifest."""

    stage: str
    key: str
    path: Path
    manifest: dict

    def file(self, name: str) -> Path:
        path = self.path / name
        if not path.exists():
            raise ArtifactError(
                f"Artifact {self.stage}/{self.key} has no file {name!r} ({self.path})."
            )
        return path


VERIFY_MODES = ("sha256", "size")
_verified: set[tuple[str, int]] = set()  # (folder, manifest mtime) checked in this process


class ArtifactStore:
    def __init__(self, root: str | Path, verify: str = "sha256"):
        """`verify`: how a finished artifact's files are checked against its manifest before
        reuse: `sha256` (every byte) or `size` (fast, catches truncation)."""
        if verify not in VERIFY_MODES:
            raise ArtifactError(f"pipeline.verify={verify!r}: use {' or '.join(VERIFY_MODES)}.")
        self.root = Path(root)
        self.verify = verify

    def folder(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def work_folder(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.partial"

    def get(self, stage: str, key: str) -> Artifact | None:
        """The finished artifact, or None (no folder, or no complete manifest)."""
        folder = self.folder(stage, key)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("key") != key or manifest.get("status") != "complete":
            return None
        self.check_files(stage, folder, manifest)
        return Artifact(stage, key, folder, manifest)

    def finished(self, stage: str, key: str) -> bool:
        """Whether a complete manifest is there (files not checked: for plans and listings)."""
        try:
            manifest = json.loads((self.folder(stage, key) / MANIFEST).read_text())
        except (OSError, ValueError):
            return False
        return manifest.get("key") == key and manifest.get("status") == "complete"

    def check_files(self, stage: str, folder: Path, manifest: dict) -> None:
        """Raise when a file differs from what the stage wrote (missing, another size, or, with
        verify=sha256, other bytes): an edited or truncated artifact is never reused."""
        seen = (str(folder), (folder / MANIFEST).stat().st_mtime_ns)
        if seen in _verified:
            return
        for name, written in manifest.get("files", {}).items():
            path = folder / name
            if not path.is_file():
                problem = "is missing"
            elif path.stat().st_size != written["bytes"]:
                problem = (
                    f"has {path.stat().st_size} bytes where the stage wrote {written['bytes']}"
                )
            elif self.verify == "sha256" and sha256_file(path) != written["sha256"]:
                problem = "has other bytes than the stage wrote (sha256 differs)"
            else:
                continue
            raise ArtifactError(
                f"{stage} artifact {folder}: {name} {problem}: it changed after the stage wrote "
                f"it, so it is not reused. Rebuild it with pipeline.force=[{stage}] (or delete "
                f"{folder})."
            )
        _verified.add(seen)

    @contextlib.contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Held while building, so two sweep jobs never build the same artifact at once."""
        lock_path = self.root / stage / f"{key}.lock"
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ArtifactError(
                f"Cannot create {lock_path.parent}: {error}. Set "
                f"paths.artifact_dir to a writable folder."
            ) from error
        try:
            lock = FileLock(str(lock_path))
            lock.acquire()
        except OSError as error:
            raise ArtifactError(
                f"Cannot lock {lock_path}: {error}. The artifact folder {self.root} must be "
                "writable: fix its permissions or set paths.artifact_dir to a writable folder."
            ) from error
        try:
            yield
        finally:
            lock.release()

    def start(self, stage: str, key: str, fresh: bool = False) -> Path:
        """The work folder for building (kept from a killed run unless `fresh`)."""
        work = self.work_folder(stage, key)
        if fresh and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        return work

    def finish(self, stage: str, key: str, manifest: dict) -> Artifact:
        """Checksum the work folder's files, write the manifest, and rename it into place."""
        work = self.work_folder(stage, key)
        manifest = dict(manifest, stage=stage, key=key, status="complete", files=checksums(work))
        write_json_atomic(work / MANIFEST, manifest)
        final = self.folder(stage, key)
        if final.exists():  # a forced rebuild replaces the old artifact only now
            old = final.with_name(f"{key}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(work, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, final)
        return Artifact(stage, key, final, manifest)


def checksums(folder: Path) -> dict[str, dict]:
    """sha256 and size of every file under `folder` (paths relative to it), manifest excluded."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            out[str(path.relative_to(folder))] = {
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
            }
    return out
