import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conflux_sdk import build

ROOT = Path(__file__).resolve().parents[3]


def test_wit_symlink_points_at_the_repo_wit():
    wit = build.wit_dir() / "entity.wit"
    assert wit.is_file()
    if wit.is_symlink():
        assert os.readlink(wit) == "../../../../wit/entity.wit"
        assert wit.resolve() == (ROOT / "wit" / "entity.wit").resolve()
    assert "world migrating-entity" in wit.read_text()


def test_entry_renders_and_compiles():
    for cls in [None, "Counter"]:
        src = build.render_entry("counter", cls)
        compile(src, "conflux_entry.py", "exec")
        assert "import counter as _user_module" in src
        assert "class Handler(_exports.Handler)" in src and "class Migration(_exports.Migration)" in src
    assert "_user_module.Counter" in build.render_entry("counter", "Counter")
    assert "find_entity(_user_module)" in build.render_entry("counter", None)


def test_native_check_reports_missing_entity(tmp_path):
    f = tmp_path / "nothing.py"
    f.write_text("x = 1\n")
    with pytest.raises(SystemExit, match="exactly one @entity"):
        build.build(f, tmp_path / "o.wasm", quiet=True)
    with pytest.raises(SystemExit, match="no class Nope"):
        build.build(f, tmp_path / "o.wasm", "Nope", quiet=True)


@pytest.mark.skipif(os.environ.get("CONFLUX_PY_BUILD_TEST") != "1", reason="set CONFLUX_PY_BUILD_TEST=1 (slow: ~10 s)")
def test_builds_a_component(tmp_path):
    f = tmp_path / "tiny.py"
    f.write_text("from conflux_sdk import entity\n@entity\nclass Tiny:\n    def ping(self):\n        return 'pong'\n")
    out = build.build(f, tmp_path / "tiny.wasm", quiet=True)
    assert out.stat().st_size > 1_000_000
    assert out.read_bytes()[:8] == b"\0asm\x0d\0\x01\0"
