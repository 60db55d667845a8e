"""The house rules of docs/architecture.md, read from the source with ``ast`` (no import):

- every core module lives in a room, and imports (module-level or inside functions) only from
  its own room or the rooms below it (``ROOMS``, bottom first); nothing inside ``photometry``
  imports the top-level package, which is the public API on top of everything;
- no import cycle, in the core or the plugins;
- a plugin imports only the public API (``photometry`` and ``photometry.testing``), never a
  private (underscore) name, and does no file or database I/O itself;
- ``BasePhotometry`` stays slim (at most ``MAX_BASE_LINES`` lines).
"""
import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the rooms, bottom first: a module may import from its own room and the ones before it
ROOMS = ("hooks", "data", "core", "output", "scheduler", "sim", "testing", "cli")
#: what a plugin may import from the core
PUBLIC_MODULES = {"photometry", "photometry.testing"}
#: the calls that mean a module does its own I/O (the core's data layer does it for plugins)
IO_CALLS = re.compile(r"\b(h5py\.File|sqlite3\.connect|fits\.open|fits\.writeto|\.writeto\(|"
                      r"savefig\(|open\()")
MAX_BASE_LINES = 350
#: plugin modules that still do their own I/O: none (the core reads every file for them);
#: this set may only shrink
KNOWN_PLUGIN_IO = set()
#: raw SQL on the task list's connection (``store.conn``) outside the TaskStore, whose
#: methods are the named queries: none (this set may only shrink)
RAW_TASK_SQL = re.compile(r"\bstore\.conn\b")
KNOWN_RAW_TASK_SQL = set()


def _modules():
    """{dotted name: path} of the core and every built-in plugin."""
    mods = {}
    for base in [ROOT / "photometry", *sorted((ROOT / "plugins").glob("photometry_*"))]:
        for path in sorted(base.rglob("*.py")):
            parts = [base.name, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(name, path):
    """(imported module, imported name or None, line) of every import in the module, the
    ones inside functions included; relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                if full in MODULES:
                    out.append((full, None, node.lineno))
                else:
                    out.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((alias.name, None, node.lineno) for alias in node.names)
    return [(t, n, line) for t, n, line in out if t.split(".")[0] in _PACKAGES]


_PACKAGES = {name.split(".")[0] for name in MODULES}


def _room(name):
    parts = name.split(".")
    return parts[1] if parts[0] == "photometry" and len(parts) > 1 else None


def test_every_core_module_is_in_a_room():
    loose = [n for n in MODULES if n.startswith("photometry.") and _room(n) not in ROOMS]
    assert not loose, f"modules outside the rooms {ROOMS}: {loose}"


def test_imports_never_point_back_up():
    bad = []
    for name, path in MODULES.items():
        room = _room(name)
        if room is None:
            continue
        for target, _, line in _imports(name, path):
            if target == "photometry":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the public API package "
                           "(import from the defining room instead)")
                continue
            up = _room(target)
            if up in ROOMS and ROOMS.index(up) > ROOMS.index(room):
                bad.append(f"{path.relative_to(ROOT)}:{line} ({room}) imports {target} ({up})")
    assert not bad, "imports pointing back up a room:\n" + "\n".join(bad)


def _cycles(edges):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return found


def import_graph():
    edges = defaultdict(set)
    for name, path in MODULES.items():
        for target, _, _ in _imports(name, path):
            if target in MODULES and target != name:
                edges[name].add(target)
    return edges


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    """The check above can fail: a two-module circle is found."""
    edges = import_graph()
    edges["photometry.hooks.errors"].add("photometry.cli")
    assert any("photometry.hooks.errors" in c for c in _cycles(edges))


def _plugin_modules():
    return {n: p for n, p in MODULES.items() if n.split(".")[0] != "photometry"}


def test_plugins_use_only_the_public_api():
    public = ast.literal_eval(_public_table())
    bad = []
    for name, path in _plugin_modules().items():
        for target, imported, line in _imports(name, path):
            if target.split(".")[0] != "photometry":
                continue
            where = f"{path.relative_to(ROOT)}:{line}"
            if target not in PUBLIC_MODULES:
                bad.append(f"{where} imports {target} (use `from photometry import ...`)")
            elif imported is not None and imported.startswith("_"):
                bad.append(f"{where} imports the private name {imported}")
            elif target == "photometry" and imported is not None and imported not in public \
                    and imported not in ("hookimpl", "hookspec", "PROJECT_NAME", "__version__"):
                bad.append(f"{where} imports {imported}, not in photometry's public API")
    assert not bad, "\n".join(bad)


def _public_table():
    """The source text of ``photometry._PUBLIC`` (read, not imported)."""
    tree = ast.parse((ROOT / "photometry" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_PUBLIC":
            return ast.unparse(node.value)
    raise AssertionError("photometry/__init__.py has no _PUBLIC table")


def test_public_api_names_exist():
    """Every name of the public API is defined where the table says (imports it)."""
    import photometry
    for name in ast.literal_eval(_public_table()):
        assert getattr(photometry, name) is not None


def test_plugins_do_no_io():
    doing = {str(p.relative_to(ROOT)) for n, p in _plugin_modules().items()
             if IO_CALLS.search(p.read_text())}
    new = doing - KNOWN_PLUGIN_IO
    assert not new, f"plugin modules doing their own I/O (use the core's data layer): {new}"
    fixed = KNOWN_PLUGIN_IO - doing
    assert not fixed, f"no longer doing I/O, remove from KNOWN_PLUGIN_IO: {fixed}"


def test_task_list_sql_only_in_the_task_store():
    """Modules ask the TaskStore by name (its methods), not with SQL on ``store.conn``."""
    doing = {str(p.relative_to(ROOT)) for p in MODULES.values()
             if RAW_TASK_SQL.search(p.read_text())}
    new = doing - KNOWN_RAW_TASK_SQL
    assert not new, f"SQL on store.conn (add a TaskStore method instead): {new}"
    fixed = KNOWN_RAW_TASK_SQL - doing
    assert not fixed, f"no longer running SQL on store.conn, remove from the list: {fixed}"


def test_base_photometry_is_slim():
    path = ROOT / "photometry" / "core" / "base.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "BasePhotometry")
    lines = cls.end_lineno - cls.lineno + 1
    assert lines <= MAX_BASE_LINES, f"BasePhotometry is {lines} lines (at most {MAX_BASE_LINES})"


@pytest.mark.parametrize("rule", ["up", "private", "io", "sql"])
def test_rules_catch_a_violation(tmp_path, monkeypatch, rule):
    """The checks can fail: a core module importing up a room, a plugin importing a private
    core name, a plugin opening a FITS file, a module running SQL on the task list."""
    if rule == "io":
        assert IO_CALLS.search("    with fits.open(path) as hdul:\n")
        assert not IO_CALLS.search("    hdul = fits.HDUList([fits.PrimaryHDU()])\n")
    elif rule == "sql":
        assert RAW_TASK_SQL.search("rows = store.conn.execute('SELECT 1').fetchall()")
        assert not RAW_TASK_SQL.search("rows = store.output_results(output)")
    elif rule == "up":
        path = tmp_path / "errors.py"
        path.write_text("from photometry.cli import main\n")
        targets = [t for t, _, _ in _imports("photometry.hooks.errors", path)]
        assert ROOMS.index(_room(targets[0])) > ROOMS.index("hooks")
    else:
        path = tmp_path / "x.py"
        path.write_text("from photometry.core.base import _SEVERITY\n")
        assert _imports("photometry_x.x", path)[0][0] not in PUBLIC_MODULES
