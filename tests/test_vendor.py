"""The idempotent patch applier of scripts/vendor_llama.py (pure Python: no patch program)."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_vendor():
    spec = importlib.util.spec_from_file_location("vendor_llama", ROOT / "scripts" / "vendor_llama.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


PATCH = """--- a/src/hello.c
+++ b/src/hello.c
@@ -1,3 +1,4 @@
 int main(void) {
+    hook();
     return 0;
 }
"""

CONFLICT = """--- a/src/hello.c
+++ b/src/hello.c
@@ -1,3 +1,3 @@
 int main(void) {
-    return 1;
+    return 2;
 }
"""


@pytest.fixture()
def tree(tmp_path):
    (tmp_path / "up" / "src").mkdir(parents=True)
    (tmp_path / "up" / "src" / "hello.c").write_text("int main(void) {\n    return 0;\n}\n")
    (tmp_path / "patches").mkdir()
    (tmp_path / "patches" / "0001-hello-hook.patch").write_text(PATCH)
    return tmp_path


def test_apply_then_skip_when_already_applied(tree):
    v = load_vendor()
    patches = sorted((tree / "patches").glob("*.patch"))
    assert v.apply_patches(tree / "up", patches) == ["applied 0001-hello-hook.patch"]
    assert "hook();" in (tree / "up" / "src" / "hello.c").read_text()
    assert v.apply_patches(tree / "up", patches) == ["already applied 0001-hello-hook.patch"]
    assert (tree / "up" / "src" / "hello.c").read_text().count("hook();") == 1


def test_patch_that_does_not_apply_is_named(tree):
    v = load_vendor()
    bad = tree / "patches" / "0002-hello-conflict.patch"
    bad.write_text(CONFLICT)
    with pytest.raises(v.VendorError, match="0002-hello-conflict.patch"):
        v.apply_patches(tree / "up", sorted((tree / "patches").glob("*.patch")))


def test_vendored_tree_matches_stamp():
    v = load_vendor()
    dest = ROOT / "vendor" / "llama.cpp"
    if not (dest / v.STAMP).is_file():
        pytest.skip("vendor/llama.cpp has not been prepared by a build")
    import json
    stamp = json.loads((dest / v.STAMP).read_text())
    assert stamp == v.stamp_for(sorted((ROOT / "patches").glob("*.patch")))


OFFSET_FILE = "".join(f"line {i}\n" for i in range(1, 41))
# written against a file whose lines 10-12 sat 5 lines earlier, a second hunk further down,
# an added file, and a file that ends without a newline
MULTI = """--- a/src/many.txt
+++ b/src/many.txt
@@ -10,3 +10,4 @@
 line 15
 line 16
+inserted after 16
 line 17
@@ -30,3 +31,2 @@
 line 35
-line 36
 line 37
--- /dev/null
+++ b/src/added.txt
@@ -0,0 +1,2 @@
+first
+second
--- a/src/tail.txt
+++ b/src/tail.txt
@@ -1,2 +1,2 @@
 a
-b
\\ No newline at end of file
+c
\\ No newline at end of file
"""


def multi_tree(root):
    (root / "src").mkdir(parents=True)
    (root / "src" / "many.txt").write_text(OFFSET_FILE)
    (root / "src" / "tail.txt").write_bytes(b"a\nb")
    return root


def test_offsets_added_files_and_missing_newlines(tmp_path):
    v = load_vendor()
    up = multi_tree(tmp_path / "up")
    (tmp_path / "p.patch").write_text(MULTI)
    assert v.apply_patches(up, [tmp_path / "p.patch"]) == ["applied p.patch"]
    many = (up / "src" / "many.txt").read_text().splitlines()
    assert many[15:18] == ["line 16", "inserted after 16", "line 17"] and "line 36" not in many
    assert len(many) == 40
    assert (up / "src" / "added.txt").read_text() == "first\nsecond\n"
    assert (up / "src" / "tail.txt").read_bytes() == b"a\nc"
    assert v.apply_patches(up, [tmp_path / "p.patch"]) == ["already applied p.patch"]


@pytest.mark.skipif(shutil.which("patch") is None, reason="the patch program is the reference here")
def test_same_result_as_the_patch_program(tmp_path):
    v = load_vendor()
    (tmp_path / "p.patch").write_text(MULTI)
    ours, theirs = multi_tree(tmp_path / "ours"), multi_tree(tmp_path / "theirs")
    v.apply_patches(ours, [tmp_path / "p.patch"])
    subprocess.run(["patch", "-p1", "--batch", "--silent", "-d", str(theirs), "-i", str(tmp_path / "p.patch")],
                   check=True)
    for f in ("many.txt", "added.txt", "tail.txt"):
        assert (ours / "src" / f).read_bytes() == (theirs / "src" / f).read_bytes(), f


def test_a_failing_patch_changes_nothing(tmp_path):
    v = load_vendor()
    up = multi_tree(tmp_path / "up")
    (up / "src" / "tail.txt").write_bytes(b"a\nz")   # the last file's hunk no longer matches
    (tmp_path / "p.patch").write_text(MULTI)
    with pytest.raises(v.VendorError, match="p.patch"):
        v.apply_patches(up, [tmp_path / "p.patch"])
    assert (up / "src" / "many.txt").read_text() == OFFSET_FILE and not (up / "src" / "added.txt").exists()


@pytest.mark.parametrize("text", ["not a patch\n", "--- a/x\n+++ b/x\n@@ -1,2 +1,2 @@\n a\n"])
def test_malformed_patches_are_refused(tmp_path, text):
    v = load_vendor()
    (tmp_path / "src").mkdir()
    (tmp_path / "x").write_text("a\nb\n")
    (tmp_path / "bad.patch").write_text(text)
    with pytest.raises(v.VendorError):
        v.apply_patches(tmp_path, [tmp_path / "bad.patch"])
