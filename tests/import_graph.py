"""The import graph of egtunnel's Rust sources (src/), and the circles in it.

Each file of src/ is one node; an edge a -> b means a.rs names something of b.rs: through a `use`
(`pub use` included), a path written in the code (`crate::pool::status()`), `super::`, or a child
module it declared (`mod scan;` then `scan::walk`). Test code counts too: a test that imports upwards
ties the files together in the test build just the same. Comments and string literals are ignored.

The layout rule is that files import only downwards: the graph has no circle (a strongly connected
component of more than one file), except those listed in ALLOWED with their reason; and the modules
appear in src/lib.rs's list (its `//! - \`name\`` lines) from the bottom up, each importing only
modules listed before it.

    python tests/import_graph.py            # every file with what it imports, then the circles
    python tests/import_graph.py --dot      # the graph for Graphviz

Exits 1 when a circle not in ALLOWED exists or the list is out of order. Standard library only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# Circles that are part of the design, by their set of files, with the reason. A circle that differs
# in any file (grew or shrank) is reported as new.
ALLOWED: dict[frozenset[str], str] = {}

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_code(text: str) -> str:
    """The source with comments, string and char literals blanked out (newlines and braces of code
    kept where they are)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        nxt = text[i + 1] if i + 1 < n else ""
        if c == "/" and nxt == "/":
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif c == "/" and nxt == "*":
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c in "rb" and re.match(r"(?:br|r)#*\"", text[i:]) and not re.match(r"[A-Za-z0-9_]", text[i - 1 : i] or " "):
            m = re.match(r"(?:br|r)(#*)\"", text[i:])
            assert m
            end = text.find('"' + m.group(1), i + m.end())
            j = n if end < 0 else end + 1 + len(m.group(1))
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "'":
            # A char literal ('x', '\n', '\u{1F600}'); otherwise a lifetime, kept.
            m = re.match(r"'(?:\\u\{[0-9a-fA-F]+\}|\\.|[^\\'\n])'", text[i:])
            if m:
                out.append(" " * m.end())
                i += m.end()
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_of(path: Path, src: Path = SRC) -> tuple[str, ...]:
    """The module path of a source file: src/lib.rs is the crate root, src/a/mod.rs is `a`."""
    parts = path.relative_to(src).with_suffix("").parts
    if parts == ("lib",):
        return ()
    if parts[-1] == "mod":
        parts = parts[:-1]
    return tuple(parts)


def expand_use(tree: str) -> list[list[str]]:
    """The paths of one use tree (`crate::{a, b::{c, d}}` -> crate::a, crate::b::c, crate::b::d)."""
    tokens = re.findall(rf"{IDENT}|::|[{{}},*]", tree)
    pos = 0

    def parse(prefix: list[str]) -> list[list[str]]:
        nonlocal pos
        path = list(prefix)
        paths: list[list[str]] = []
        while pos < len(tokens):
            t = tokens[pos]
            if t == "{":
                pos += 1
                while pos < len(tokens) and tokens[pos] != "}":
                    paths += parse(path)
                    if pos < len(tokens) and tokens[pos] == ",":
                        pos += 1
                pos += 1
                return paths
            if t in (",", "}"):
                break
            if t == "as":
                pos += 2
                continue
            if t not in ("::", "*"):
                path.append(t)
            pos += 1
        return paths + [path]

    out: list[list[str]] = []
    while pos < len(tokens):
        out += parse([])
        if pos < len(tokens) and tokens[pos] == ",":
            pos += 1
    return out


class Graph:
    def __init__(self, src: Path = SRC) -> None:
        self.src = src
        files = sorted(p for p in src.rglob("*.rs"))
        self.files = {module_of(p, src): p for p in files}
        self.names = {m: str(p.relative_to(src)) for m, p in self.files.items()}
        self.edges: dict[str, set[str]] = {name: set() for name in self.names.values()}
        for mod, path in self.files.items():
            self._scan(mod, path)

    def _resolve(self, segments: list[str]) -> str | None:
        """The file holding the longest module prefix of an absolute path."""
        for k in range(len(segments), -1, -1):
            if tuple(segments[:k]) in self.files:
                return self.names[tuple(segments[:k])]
        return None

    def _scan(self, mod: tuple[str, ...], path: Path) -> None:
        code = strip_code(path.read_text())
        me = self.names[mod]
        children = set(re.findall(rf"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+({IDENT})\s*;", code, re.M))
        # Inline modules (`mod tests { ... }`): `super::` inside one first leaves it, within this file.
        depth_at = [0] * (len(code) + 1)
        stack: list[int] = []
        braces = 0
        inline_opens = {m.end() - 1 for m in re.finditer(rf"\bmod\s+{IDENT}\s*\{{", code)}
        for i, c in enumerate(code):
            if c == "{":
                braces += 1
                if i in inline_opens:
                    stack.append(braces)
            elif c == "}":
                if stack and stack[-1] == braces:
                    stack.pop()
                braces -= 1
            depth_at[i + 1] = len(stack)

        def absolute(segs: list[str], at: int) -> list[str] | None:
            if not segs:
                return None
            if segs[0] == "crate":
                return segs[1:]
            if segs[0] in ("super", "self"):
                inline = depth_at[at]
                base = list(mod)
                rest = list(segs)
                while rest and rest[0] in ("super", "self"):
                    if rest.pop(0) == "super":
                        if inline:
                            inline -= 1
                        elif base:
                            base.pop()
                if inline:
                    return None  # stays inside this file's inline module
                return base + rest
            if segs[0] in children:
                return list(mod) + segs
            return None

        refs: list[tuple[list[str], int]] = []
        for m in re.finditer(r"\buse\s+([^;]+);", code):
            for p in expand_use(m.group(1)):
                refs.append((p, m.start()))
        use_spans = [(m.start(), m.end()) for m in re.finditer(r"\buse\s+[^;]+;", code)]
        for m in re.finditer(rf"(?<![A-Za-z0-9_:])({IDENT}(?:::{IDENT})+)", code):
            if any(a <= m.start() < b for a, b in use_spans):
                continue
            refs.append((m.group(1).split("::"), m.start()))
        for segs, at in refs:
            target = absolute(segs, at)
            if target is None:
                continue
            dest = self._resolve(target)
            if dest and dest != me and dest != "lib.rs":
                self.edges[me].add(dest)

    def cycles(self) -> list[list[str]]:
        """Strongly connected components of more than one file (Tarjan), each sorted, largest first."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        on_stack: set[str] = set()
        stack: list[str] = []
        out: list[list[str]] = []
        counter = 0

        def visit(v: str) -> None:
            nonlocal counter
            index[v] = low[v] = counter
            counter += 1
            stack.append(v)
            on_stack.add(v)
            for w in sorted(self.edges[v]):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

        sys.setrecursionlimit(max(1000, 10 * len(self.edges)))
        for v in sorted(self.edges):
            if v not in index:
                visit(v)
        return sorted(out, key=lambda c: (-len(c), c))

    def layers(self) -> list[str]:
        """The top-level modules in the order src/lib.rs lists them."""
        lib = (self.src / "lib.rs").read_text()
        return re.findall(rf"^//! - `({IDENT})`", lib, re.M)

    def order_violations(self) -> list[str]:
        """What breaks the bottom-up order of src/lib.rs's list: modules missing from it or listed twice,
        and imports of a module listed later (within one folder module, its files may import each other
        in any order the circle check allows)."""
        order = self.layers()
        top = {name: mod[0] for mod, name in self.names.items() if mod}
        problems = []
        for m in sorted(set(top.values()) - set(order)):
            problems.append(f"module {m} is not in src/lib.rs's list")
        for m in sorted({m for m in order if order.count(m) > 1}):
            problems.append(f"module {m} is listed twice in src/lib.rs")
        rank = {m: i for i, m in enumerate(order)}
        for a in sorted(self.edges):
            for b in sorted(self.edges[a]):
                ta, tb = top.get(a), top.get(b)
                if ta is None or tb is None or ta == tb or ta not in rank or tb not in rank:
                    continue
                if rank[tb] > rank[ta]:
                    problems.append(f"{a} imports {b}, listed after it")
        return problems

    def unexpected_cycles(self) -> list[list[str]]:
        return [c for c in self.cycles() if frozenset(c) not in ALLOWED]

    def report(self) -> str:
        lines = []
        width = max(len(n) for n in self.edges)
        for name in sorted(self.edges):
            lines.append(f"{name:<{width}}  -> {', '.join(sorted(self.edges[name])) or '-'}")
        lines.append("")
        cycles = self.cycles()
        if not cycles:
            lines.append("no import circle")
        for c in cycles:
            reason = ALLOWED.get(frozenset(c))
            tag = f"allowed: {reason}" if reason else "NOT ALLOWED"
            lines.append(f"circle of {len(c)} files ({tag}): {', '.join(c)}")
        order = self.order_violations()
        lines.append("src/lib.rs lists the modules bottom-up" if not order else "order of src/lib.rs's list:")
        lines += [f"  {p}" for p in order]
        return "\n".join(lines)

    def dot(self) -> str:
        lines = ["digraph egtunnel {", "  rankdir=TB;"]
        for a in sorted(self.edges):
            for b in sorted(self.edges[a]):
                lines.append(f'  "{a}" -> "{b}";')
        lines.append("}")
        return "\n".join(lines)


def main(argv: list[str]) -> int:
    graph = Graph()
    print(graph.dot() if "--dot" in argv else graph.report())
    return 1 if graph.unexpected_cycles() or graph.order_violations() else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
