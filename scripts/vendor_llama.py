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
import shutil
import subprocess
import sys
import tarfile
import tempfile
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


def run_patch(tree: Path, patch: Path, *extra: str) -> bool:
    # -d changes directory before -i is read: both absolute
    cmd = ["patch", "-p1", "--batch", "--silent", "-d", str(tree.resolve()), "-i", str(patch.resolve()), *extra]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def apply_patches(tree: Path, patches: list[Path]) -> list[str]:
    """Apply patches in order; skip the ones already applied. Returns a log of actions."""
    if patches and shutil.which("patch") is None:
        raise VendorError("the 'patch' program is needed to apply patches/ (install it)")
    log = []
    for p in patches:
        if run_patch(tree, p, "--forward", "--dry-run"):
            if not run_patch(tree, p, "--forward"):
                raise VendorError(f"patch {p.name} passed a dry run but failed to apply")
            log.append(f"applied {p.name}")
        elif run_patch(tree, p, "--reverse", "--dry-run"):
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
