#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source, verify it, extract it and apply our patches.

The pinned upstream is the ``vendor/llama.cpp`` directory of the source distribution of
llama-cpp-python 0.3.36 (llama.cpp commit 0c1e57098). The archive is downloaded once with
pip into the user cache directory, checked against its sha256, and only
``vendor/llama.cpp/`` is extracted. Then every ``patches/NNNN-*.patch`` is applied in
order. Running the script again is cheap and safe:

* a stamp file records the archive hash and the hash of every applied patch; when it
  matches, nothing is done;
* a patch that is already applied (its reverse applies cleanly) is skipped;
* a patch that applies neither way stops the script with a message naming it.

Environment:
  PYLLAMA_INF_UPSTREAM_SDIST  path of a local copy of the archive (no download)
  PYLLAMA_INF_CACHE           cache directory (default: $XDG_CACHE_HOME/pyllama-inf)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
SDIST_REQ = "llama-cpp-python==0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
UPSTREAM_COMMIT = "0c1e57098"
STAMP = ".pyllama-inf-stamp.json"


class VendorError(RuntimeError):
    """Raised when the upstream source cannot be fetched, verified or patched."""


def cache_dir() -> Path:
    env = os.environ.get("PYLLAMA_INF_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyllama-inf"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist() -> Path:
    """Return a verified local path of the pinned archive, downloading it if needed."""
    local = os.environ.get("PYLLAMA_INF_UPSTREAM_SDIST")
    if local:
        path = Path(local)
        if not path.is_file():
            raise VendorError(f"PYLLAMA_INF_UPSTREAM_SDIST={local} is not a file")
    else:
        dl = cache_dir() / "downloads"
        dl.mkdir(parents=True, exist_ok=True)
        path = dl / SDIST_NAME
        if not path.is_file() or sha256_of(path) != SDIST_SHA256:
            with tempfile.TemporaryDirectory(dir=dl) as tmp:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                       "llama-cpp-python", "--no-build-isolation", "--disable-pip-version-check",
                       "-q", "-d", tmp, SDIST_REQ]
                print(f"vendor: downloading {SDIST_REQ} source distribution", file=sys.stderr)
                res = subprocess.run(cmd, capture_output=True, text=True)
                got = Path(tmp) / SDIST_NAME
                if not got.is_file():
                    raise VendorError(
                        f"could not download {SDIST_REQ} with pip (exit {res.returncode}):\n"
                        f"{res.stderr.strip()[-2000:]}\n"
                        "Set PYLLAMA_INF_UPSTREAM_SDIST to a local copy of "
                        f"{SDIST_NAME} to build offline.")
                os.replace(got, path)
    digest = sha256_of(path)
    if digest != SDIST_SHA256:
        raise VendorError(f"{path}: sha256 {digest} does not match the pinned {SDIST_SHA256}")
    return path


def extract(sdist: Path, dest: Path) -> None:
    """Extract only vendor/llama.cpp/ of the archive into dest (replacing it)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.name.startswith(SDIST_PREFIX) or member.name == SDIST_PREFIX:
                continue
            if not (member.isfile() or member.isdir()):
                continue  # the pinned tree holds no links we need
            rel = member.name[len(SDIST_PREFIX):]
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise VendorError(f"unsafe path in archive: {member.name}")
            target = tmp / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            os.chmod(target, member.mode & 0o755 | 0o644)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


@dataclass
class Hunk:
    """One @@ hunk: the lines it expects (context and removals) and what replaces them."""

    start: int            # 1-based line of the old text where the hunk begins
    old: list[bytes]
    new: list[bytes]


@dataclass
class FilePatch:
    path: str             # relative to the tree (the a/ b/ prefixes removed)
    hunks: list[Hunk]
    created: bool         # --- /dev/null


_HUNK = re.compile(rb"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def _strip_prefix(name: bytes) -> str:
    name = name.split(b"\t")[0].strip()
    text = name.decode("utf-8")
    return text.split("/", 1)[1] if "/" in text else text


def parse_patch(data: bytes, name: str = "patch") -> list[FilePatch]:
    """The files and hunks of a unified diff (git or diff -u output, one level of prefix)."""
    lines = data.splitlines(keepends=True)
    files: list[FilePatch] = []
    i = 0
    while i < len(lines):
        if not (lines[i].startswith(b"--- ") and i + 1 < len(lines) and lines[i + 1].startswith(b"+++ ")):
            i += 1
            continue
        created = lines[i][4:].split(b"\t")[0].strip() == b"/dev/null"
        new_name = lines[i + 1][4:].split(b"\t")[0].strip()
        if new_name == b"/dev/null":
            raise VendorError(f"{name}: deleting files is not supported")
        fp = FilePatch(_strip_prefix(new_name), [], created)
        i += 2
        while i < len(lines) and lines[i].startswith(b"@@"):
            m = _HUNK.match(lines[i])
            if not m:
                raise VendorError(f"{name}: bad hunk header {lines[i][:60]!r}")
            n_old = int(m.group(2) or b"1")
            n_new = int(m.group(4) or b"1")
            hunk = Hunk(int(m.group(1)), [], [])
            i += 1
            last = None
            while i < len(lines) and (n_old > 0 or n_new > 0 or lines[i].startswith(b"\\")):
                line = lines[i]
                tag, body = line[:1], line[1:]
                if tag == b"\\":   # "\ No newline at end of file": the line before ends without one
                    if last is not None and last and last[-1].endswith(b"\n"):
                        last[-1] = last[-1][:-1]
                    i += 1
                    continue
                if line in (b"\n", b"\r\n"):
                    tag, body = b" ", line   # an empty context line whose space was trimmed
                if tag == b" ":
                    hunk.old.append(body)
                    hunk.new.append(body)
                    n_old, n_new = n_old - 1, n_new - 1
                    last = None
                elif tag == b"-":
                    hunk.old.append(body)
                    n_old -= 1
                    last = hunk.old
                elif tag == b"+":
                    hunk.new.append(body)
                    n_new -= 1
                    last = hunk.new
                else:
                    raise VendorError(f"{name}: unexpected line in a hunk: {line[:60]!r}")
                i += 1
            if n_old != 0 or n_new != 0:
                raise VendorError(f"{name}: a hunk of {fp.path} is truncated")
            fp.hunks.append(hunk)
        files.append(fp)
    if not files:
        raise VendorError(f"{name}: no file changes found")
    return files


def _apply_hunks(text: list[bytes], hunks: list[Hunk], reverse: bool) -> list[bytes] | None:
    """text with every hunk applied (the hunk's old lines found at their line or the nearest
    offset, in order, without fuzz); None when one does not match."""
    out = list(text)
    shift = 0   # lines added so far by earlier hunks
    floor = 0   # a hunk may not match before the end of the previous one
    for h in hunks:
        old, new = (h.new, h.old) if reverse else (h.old, h.new)
        want = max(0, h.start - 1 + shift if old else h.start + shift)
        found = None
        for d in range(len(out) + 1):
            for at in (want - d, want + d) if d else (want,):
                if floor <= at <= len(out) - len(old) and out[at:at + len(old)] == old:
                    found = at
                    break
            if found is not None:
                break
        if found is None:
            return None
        out[found:found + len(old)] = new
        shift += len(new) - len(old)
        floor = found + len(new)
    return out


def patched_files(tree: Path, patch: Path, reverse: bool = False) -> dict[Path, bytes] | None:
    """The new content of every file the patch touches (nothing written), or None when it
    does not apply (forward, or backward with reverse)."""
    result = {}
    for fp in parse_patch(patch.read_bytes(), patch.name):
        target = tree / fp.path
        if ".." in Path(fp.path).parts or Path(fp.path).is_absolute():
            raise VendorError(f"{patch.name}: unsafe path {fp.path}")
        if fp.created and not reverse:
            if target.exists():
                return None
            text: list[bytes] = []
        elif not target.is_file():
            return None
        else:
            text = target.read_bytes().splitlines(keepends=True)
        got = _apply_hunks(text, fp.hunks, reverse)
        if got is None:
            return None
        result[target] = b"".join(got)
    return result


def apply_patches(tree: Path, patches: list[Path]) -> list[str]:
    """Apply patches in order (in Python: no patch program needed); skip the ones already
    applied. Returns a log of actions."""
    log = []
    for p in patches:
        files = patched_files(tree, p)
        if files is not None:
            for target, data in files.items():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            log.append(f"applied {p.name}")
        elif patched_files(tree, p, reverse=True) is not None:
            log.append(f"already applied {p.name}")
        else:
            raise VendorError(
                f"patch {p.name} does not apply to llama.cpp {UPSTREAM_COMMIT} in {tree} "
                "(and is not already applied); refresh the patch or delete the tree to start over")
    return log


def stamp_for(patches: list[Path]) -> dict:
    return {"sdist_sha256": SDIST_SHA256,
            "patches": [[p.name, sha256_of(p)] for p in patches]}


def vendor(dest: Path, patch_dir: Path, force: bool = False) -> None:
    patches = sorted(patch_dir.glob("*.patch")) if patch_dir.is_dir() else []
    want = stamp_for(patches)
    stamp_path = dest / STAMP
    if not force and stamp_path.is_file():
        try:
            have = json.loads(stamp_path.read_text())
        except ValueError:
            have = None
        if have == want:
            return
        # Same upstream, different patch set: start from a pristine tree so a removed or
        # edited patch does not leave stale hunks behind.
        force = True
    if force or not (dest / "CMakeLists.txt").is_file():
        extract(fetch_sdist(), dest)
    for line in apply_patches(dest, patches):
        print(f"vendor: {line}", file=sys.stderr)
    stamp_path.write_text(json.dumps(want, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=root / "vendor" / "llama.cpp")
    ap.add_argument("--patches", type=Path, default=root / "patches")
    ap.add_argument("--force", action="store_true", help="re-extract and re-patch")
    args = ap.parse_args(argv)
    try:
        vendor(args.dest, args.patches, args.force)
    except VendorError as e:
        print(f"vendor: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
