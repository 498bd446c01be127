"""The Rust sources import only downwards: no circle in src/'s import graph beyond those
tests/import_graph.py allows by name, with their reason."""

from __future__ import annotations

import import_graph


def test_no_import_circle() -> None:
    graph = import_graph.Graph()
    unexpected = graph.unexpected_cycles()
    assert not unexpected, "import circles among src/ files (see `python tests/import_graph.py`):\n" + "\n".join(
        ", ".join(c) for c in unexpected
    )


def test_lib_rs_lists_the_modules_bottom_up() -> None:
    problems = import_graph.Graph().order_violations()
    assert not problems, "src/lib.rs's module list must go bottom-up (see `python tests/import_graph.py`):\n" + "\n".join(problems)


def test_allowed_circles_still_exist() -> None:
    # An allowed circle that is gone (or changed) should leave the list, so the list stays a true account.
    found = {frozenset(c) for c in import_graph.Graph().cycles()}
    stale = [sorted(c) for c in import_graph.ALLOWED if c not in found]
    assert not stale, f"allowed circles not found any more; remove them from ALLOWED: {stale}"


def test_the_graph_sees_every_kind_of_reference(tmp_path) -> None:
    # A small crate with one reference of each kind the script follows, and some it must not.
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    (src / "lib.rs").write_text("//! - `d`\n//! - `c`\n//! - `b`\n//! - `a`\npub mod a;\npub mod b;\npub mod c;\npub mod d;\n")
    (src / "a.rs").write_text(
        "use crate::{b::{self, inner::X}, c};\n"
        "// crate::d::in_a_comment\n"
        'const S: &str = "crate::d::in_a_string";\n'
        "#[cfg(test)]\nmod tests {\n    use super::*;\n}\n"
    )
    (src / "b" / "mod.rs").write_text("mod inner;\npub fn f() { inner::g(); }\n")
    (src / "b" / "inner.rs").write_text("pub struct X;\npub fn g() { super::super::d::h(); }\n")
    (src / "c.rs").write_text("pub fn k() { let _ = crate::d::h(); }\n")
    (src / "d.rs").write_text("pub fn h() {}\n#[cfg(test)]\nmod tests { use crate::a; }\n")
    g = import_graph.Graph(src)
    assert g.edges["a.rs"] == {"b/mod.rs", "b/inner.rs", "c.rs"}
    assert g.edges["b/mod.rs"] == {"b/inner.rs"}
    assert g.edges["b/inner.rs"] == {"d.rs"}
    assert g.edges["c.rs"] == {"d.rs"}
    assert g.edges["d.rs"] == {"a.rs"}
    assert g.cycles() == [["a.rs", "b/inner.rs", "b/mod.rs", "c.rs", "d.rs"]]
    assert g.order_violations() == ["d.rs imports a.rs, listed after it"]
