"""The idempotent patch applier of scripts/vendor_llama.py."""

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("patch") is None, reason="needs the patch program")


def load_vendor():
    spec = importlib.util.spec_from_file_location("vendor_llama", ROOT / "scripts" / "vendor_llama.py")
    mod = importlib.util.module_from_spec(spec)
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
