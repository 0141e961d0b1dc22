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


ASKER = '''
from conflux_sdk import AskError, EntityRef, continuation, entity, messaging


@entity
class Asker:
    def __init__(self):
        self.seen = []

    def go(self, team):
        return messaging.ask(EntityRef("team", team), "add_member", "sue", continuation="on_added",
                             context=team, timeout_ms=2500)

    @continuation
    def on_added(self, result, ask):
        if isinstance(result, AskError):
            got = [result.kind, None if result.error is None else [result.error.kind, result.error.message], result.reason]
        else:
            got = ["ok", result]
        self.seen.append(got + [ask.id, str(ask.callee), ask.context])
'''


@pytest.fixture
def entry_of(tmp_path, monkeypatch):
    """A factory: the entry generated for module ``module`` of ``files`` (name → source),
    imported natively over componentize-py's own generated bindings (`componentize-py
    bindings`), with the WIT imports stubbed in memory."""
    bindings = tmp_path / "bindings"
    cmd = build.componentize_command() + ["-d", str(build.wit_dir()), "-w", build.WORLD, "bindings", str(bindings)]
    try:
        done = subprocess.run(cmd, capture_output=True)
    except OSError:
        pytest.skip("componentize-py is not installed")
    if done.returncode != 0:
        pytest.skip(f"componentize-py bindings failed: {done.stderr.decode()[-300:]}")
    from conflux_sdk import _core

    monkeypatch.setattr(_core, "_host", None)  # the entry installs its host; put the SDK's back afterwards
    before = set(sys.modules)

    def load(files, module):
        (tmp_path / "m").mkdir()
        for name, source in files.items():
            (tmp_path / "m" / f"{name}.py").write_text(source)
        (tmp_path / "m" / f"{build.ENTRY_MODULE}.py").write_text(build.render_entry(module, None))
        for p in [bindings, tmp_path / "m"]:
            monkeypatch.syspath_prepend(str(p))
        import wit_world.imports.context as wc
        import wit_world.imports.messaging as wm
        import wit_world.imports.state as ws
        import wit_world.imports.types as wt

        store, calls = {}, {"ask": [], "reply": None}
        monkeypatch.setattr(ws, "get", lambda k: store.get(k))
        monkeypatch.setattr(ws, "set", lambda k, v: store.__setitem__(k, bytes(v)))
        monkeypatch.setattr(wc, "self_ref", lambda: wt.EntityRef("user", "sue"))
        monkeypatch.setattr(wc, "caller", lambda: None)
        monkeypatch.setattr(wm, "ask", lambda *a: calls["ask"].append(a) or "ask-7")
        monkeypatch.setattr(wm, "reply", lambda: calls["reply"])
        import conflux_entry

        return conflux_entry, wm, wt, store, calls

    yield load
    for name in set(sys.modules) - before:
        del sys.modules[name]


@pytest.fixture
def generated_entry(entry_of):
    return entry_of({"asker": ASKER}, "asker")


def test_the_entry_binds_ask_and_reply_to_the_wit(generated_entry):
    entry, wm, wt, store, calls = generated_entry
    from componentize_py_types import Err, Ok

    handler = entry.Handler()
    assert handler.handle("go", b'"red"') == b'"ask-7"'
    ((target, op, payload, cont, ctx, timeout),) = calls["ask"]
    assert isinstance(target, wt.EntityRef) and (target.entity_type, target.id) == ("team", "red")
    assert (op, payload, cont, ctx, timeout) == ("add_member", b'"sue"', "on_added", b'"red"', 2500)
    with pytest.raises(Err) as e:  # not a reply turn: refused as in Rust
        handler.handle("on_added", b"")
    assert e.value.value == wt.CallError_BadRequest("'on_added' is a continuation: only the reply to an ask runs it")
    outcomes = [
        Ok(b"null"),
        Err(wm.AskError_Refused(wt.CallError_Failed("team red is full"))),
        Err(wm.AskError_Refused(wt.CallError_BadRequest("no"))),
        Err(wm.AskError_TimedOut()),
        Err(wm.AskError_Undeliverable("type team is not deployed")),
    ]
    for outcome in outcomes:
        calls["reply"] = wm.AskReply("ask-7", wt.EntityRef("team", "red"), outcome, b'"red"')
        handler.handle("on_added", b"")
    import json

    assert json.loads(store["$self"])["seen"] == [
        ["ok", None, "ask-7", "team/red", "red"],
        ["refused", ["failed", "team red is full"], None, "ask-7", "team/red", "red"],
        ["refused", ["bad-request", "no"], None, "ask-7", "team/red", "red"],
        ["timed_out", None, None, "ask-7", "team/red", "red"],
        ["undeliverable", None, "type team is not deployed", "ask-7", "team/red", "red"],
    ]


TEAM = '''
from conflux_sdk import Failed, entity


@entity
class Team:
    def add_member(self, user: str):
        raise Failed("TEAM-CODE-RAN")
'''

TYPED_ASKER = '''
from conflux_sdk import ask, continuation, entity
from team import Team  # the callee's class, for its typed client only


@entity
class Asker:
    def go(self, team):
        return ask(Team, team).add_member("sue", continuation=self.on_added, context=team, timeout_ms=2500)

    @continuation
    def on_added(self, result):
        pass
'''


def test_a_module_importing_its_callee_serves_only_its_own_entity(entry_of, tmp_path):
    """What Rust's `client` feature does for a callee crate: the caller's component
    imports the callee's class for its typed ask client, and its handler serves the
    caller's entity alone (conflux-build picks the @entity its own module defines)."""
    entry, wm, wt, store, calls = entry_of({"team": TEAM, "asker": TYPED_ASKER}, "asker")
    from componentize_py_types import Err

    assert entry.ENTITY.__name__ == "Asker" and entry.ENTITY.__module__ == "asker"
    handler = entry.Handler()
    assert handler.handle("go", b'"red"') == b'"ask-7"'
    ((target, op, payload, cont, ctx, timeout),) = calls["ask"]
    assert (target.entity_type, target.id, op, payload, cont, ctx, timeout) == (
        "team", "red", "add_member", b'"sue"', "on_added", b'"red"', 2500)
    with pytest.raises(Err) as e:  # the team's operation is not this component's
        handler.handle("add_member", b'"sue"')
    assert e.value.value == wt.CallError_UnknownOperation(
        "unknown operation 'add_member' for entity type Asker; offered: go")
    assert build._check_natively(tmp_path / "m" / "asker.py", "asker", None) is None, "conflux-build accepts it"
