"""Topology specs: the shipped files, the API other modules use, the check report, bad input."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import networkx as nx
import pytest

from m3tgossip.errors import ConfigError
from m3tgossip.topology import (
    Topology,
    check_report,
    format_report,
    load_topology,
    parse_topology,
)

SPECS = Path(__file__).resolve().parent.parent / "topology"
SHIPPED = sorted(p.name for p in SPECS.glob("*.toml"))
KEY_A = "tz8w1x2QZhPdbkEdG(nQGHlsB&0<jfyZPxlyIVMM"
KEY_B = "g[lGXxqSMAUHP[i.Tij]2(3t&np)YpyAhNgDs7>a"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _same_spec(a: Topology, b: Topology) -> bool:
    return dataclasses.replace(a, source="") == dataclasses.replace(b, source="")


# ----------------------------------------------------------------------------- shipped specs


def test_the_expected_specs_ship() -> None:
    assert {
        "campus.toml",
        "complete-6.toml",
        "erdos-renyi-12.toml",
        "ring-8.toml",
        "small-world-16.toml",
        "torus-16.toml",
    } <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spec_loads_connected_and_described(name: str) -> None:
    topology = load_topology(SPECS / name)
    assert topology.name == Path(name).stem
    assert topology.description
    assert nx.is_connected(topology.graph())
    report = check_report(topology)
    assert report["connected"]
    assert report["warnings"] == []
    assert all(c["connected"] for c in report["components"].values())


@pytest.mark.parametrize(
    ("name", "nodes", "edges", "degrees"),
    [
        ("ring-8.toml", 8, 8, {2}),
        ("torus-16.toml", 16, 32, {4}),
        ("complete-6.toml", 6, 15, {5}),
        ("small-world-16.toml", 16, 32, None),
        ("erdos-renyi-12.toml", 12, None, None),
    ],
)
def test_generated_specs_have_their_shape(
    name: str, nodes: int, edges: int | None, degrees: set[int] | None
) -> None:
    topology = load_topology(SPECS / name)
    assert topology.ids() == [f"n{i}" for i in range(nodes)]
    if edges is not None:
        assert len(topology.edges) == edges
    if degrees is not None:
        assert {d for _, d in topology.graph().degree()} == degrees
    for node in topology.nodes:
        assert node.modalities == ("clickstream", "tabular")
        assert node.tasks == ("at_risk",)


@pytest.mark.parametrize("name", ["small-world-16.toml", "erdos-renyi-12.toml"])
def test_seeded_specs_are_deterministic(name: str) -> None:
    assert load_topology(SPECS / name).edges == load_topology(SPECS / name).edges


def test_torus_is_a_4x4_wraparound_grid() -> None:
    topology = load_topology(SPECS / "torus-16.toml")
    # n5 is row 1, column 1: up, down, left, right
    assert topology.neighbours("n5") == ["n1", "n4", "n6", "n9"]
    # n0 wraps to row 3 and column 3
    assert topology.neighbours("n0") == ["n1", "n12", "n3", "n4"]


def test_complete_graph_mixes_in_one_round() -> None:
    report = check_report(load_topology(SPECS / "complete-6.toml"))
    assert report["mh_slem"] == pytest.approx(0.0, abs=1e-12)
    assert report["predicted_rounds"] == 1


def test_campus_is_three_institutions() -> None:
    topology = load_topology(SPECS / "campus.toml")
    assert 12 <= len(topology.nodes) <= 16
    institutions = {n.institution for n in topology.nodes}
    assert institutions == {"uni-a", "uni-b", "college-c"}
    privacy = set()
    for institution in institutions:
        members = [n for n in topology.nodes if n.institution == institution]
        roles = [n.role for n in members]
        assert roles.count("institution") == 1
        assert roles.count("instructor") >= 1
        assert roles.count("student") >= 2
        profiles = {n.privacy for n in members}
        assert len(profiles) == 1
        privacy |= profiles
    assert privacy == {"gdpr", "ferpa", "open"}
    servers = [n.id for n in topology.nodes if n.role == "institution"]
    for server in servers:
        assert set(servers) - {server} <= set(topology.neighbours(server))
    assert any(n.compute == "lite" for n in topology.nodes)
    assert any(c.startswith("head.") for n in topology.nodes for c in n.local)
    for node in topology.nodes:
        assert node.modalities and node.tasks
        if "stress" in node.tasks:
            assert "signal" in node.modalities
        if "handwriting" in node.tasks:
            assert "image" in node.modalities
    for component in topology.components():
        assert nx.is_connected(topology.component_graph(component)), component


@pytest.mark.parametrize("name", SHIPPED)
def test_round_trip_through_toml(tmp_path: Path, name: str) -> None:
    original = load_topology(SPECS / name)
    again = load_topology(_write(tmp_path, name, original.to_toml()))
    assert _same_spec(original, again)


def test_round_trip_keeps_every_attribute(tmp_path: Path) -> None:
    text = f"""
name = "odd \\"quoted\\" name"
description = "tab\\there, backslash \\\\ and ü"
edges = [["a", "b"]]
[[nodes]]
id = "a"
role = "institution"
institution = "uni-x"
modalities = ["text", "image"]
tasks = ["handwriting", "my_task"]
host = "10.0.0.7"
port = 6000
compute = "lite"
privacy = "custom"
public_key = '{KEY_A}'
local = ["prompt.my_task"]
[[nodes]]
id = "b"
modalities = ["image"]
tasks = ["handwriting"]
"""
    original = load_topology(_write(tmp_path, "odd.toml", text))
    again = load_topology(_write(tmp_path, "again.toml", original.to_toml()))
    assert _same_spec(original, again)
    assert again.node("a").public_key == KEY_A


def test_speed_and_bandwidth_declare_a_straggler(tmp_path: Path) -> None:
    text = _explicit(b="speed = 0.1") + "bandwidth = 0.3\n"
    topo = load_topology(_write(tmp_path, "pace.toml", text))
    a, b, c = (topo.node(i) for i in "abc")
    assert (a.speed, a.bandwidth, a.straggler, a.send_every) == (1.0, 1.0, False, 1)
    assert (b.speed, b.bandwidth, b.straggler, b.send_every) == (0.1, 1.0, True, 1)
    assert (c.speed, c.bandwidth, c.straggler, c.send_every) == (1.0, 0.3, True, 4)
    text = topo.to_toml()
    assert "speed = 0.1" in text and "bandwidth = 0.3" in text and text.count("speed") == 1
    again = load_topology(_write(tmp_path, "again.toml", text))
    assert _same_spec(topo, again)
    report = check_report(topo)
    assert [(n["speed"], n["bandwidth"]) for n in report["nodes"]] == [(1, 1), (0.1, 1), (1, 0.3)]
    stragglers = [w for w in report["warnings"] if "straggler" in w]
    assert len(stragglers) == 2 and "node b: declared a straggler (speed 0.1" in stragglers[0]


def test_a_node_declares_how_many_records_it_holds(tmp_path: Path) -> None:
    topo = load_topology(_write(tmp_path, "records.toml", _explicit(b="records = 480")))
    assert [topo.node(i).records for i in "abc"] == [None, 480, None]
    text = topo.to_toml()
    assert text.count("records = 480") == 1
    assert _same_spec(topo, load_topology(_write(tmp_path, "again.toml", text)))


# ----------------------------------------------------------------------------- the API

MINI = """
name = "mini"
edges = [["a", "b"], ["b", "c"], ["c", "d"], ["a", "d"], ["d", "e"]]
[[nodes]]
id = "a"
modalities = ["text", "clickstream"]
tasks = ["at_risk", "engagement"]
[[nodes]]
id = "b"
modalities = ["clickstream"]
tasks = ["at_risk", "engagement"]
local = ["head.engagement"]
[[nodes]]
id = "c"
modalities = ["text", "clickstream"]
[[nodes]]
id = "d"
modalities = ["text", "clickstream"]
tasks = ["engagement"]
[[nodes]]
id = "e"
modalities = ["clickstream"]
tasks = ["engagement"]
port = 5702
"""


@pytest.fixture
def mini(tmp_path: Path) -> Topology:
    return load_topology(_write(tmp_path, "mini.toml", MINI))


def test_nodes_and_components(mini: Topology) -> None:
    assert mini.ids() == ["a", "b", "c", "d", "e"]
    assert [n.index for n in mini.nodes] == [0, 1, 2, 3, 4]
    b = mini.node("b")
    assert b.components == (
        "backbone",
        "encoder.clickstream",
        "fusion",
        "head.at_risk",
        "head.engagement",
        "prompt.at_risk",
        "prompt.engagement",
    )
    assert "head.engagement" not in b.shared_components
    assert len(b.shared_components) == len(b.components) - 1
    assert mini.edges == (("a", "b"), ("a", "d"), ("b", "c"), ("c", "d"), ("d", "e"))
    with pytest.raises(KeyError, match='no node "zz"'):
        mini.node("zz")


@pytest.mark.parametrize(
    ("component", "holders", "neighbours_of_d"),
    [
        ("backbone", ["a", "b", "c", "d", "e"], ["a", "c", "e"]),
        ("encoder.text", ["a", "c", "d"], ["a", "c"]),
        ("head.engagement", ["a", "d", "e"], ["a", "e"]),  # b keeps its own
        ("head.at_risk", ["a", "b", "c"], None),  # d does not hold it
        ("encoder.signal", [], None),
    ],
)
def test_holders_and_component_neighbours(
    mini: Topology, component: str, holders: list[str], neighbours_of_d: list[str] | None
) -> None:
    assert mini.holders(component) == holders
    if neighbours_of_d is None:
        with pytest.raises(KeyError):
            mini.component_neighbours("d", component)
    else:
        assert mini.component_neighbours("d", component) == neighbours_of_d
        assert sorted(mini.component_graph(component).nodes) == holders


def test_components_lists_only_shared_ones(mini: Topology) -> None:
    components = mini.components()
    assert components == sorted(components)
    assert "head.engagement" in components  # shared by a, d, e
    assert "encoder.signal" not in components
    assert mini.neighbours("d") == ["a", "c", "e"]


def test_holder_subgraphs_keep_spec_order() -> None:
    topology = load_topology(SPECS / "campus.toml")
    for component in topology.components():
        graph = topology.component_graph(component)
        assert list(graph.nodes) == topology.holders(component), component
        assert check_report(topology)["components"][component]["holders"] == list(graph.nodes)


def test_graph_is_cached_and_frozen(mini: Topology) -> None:
    assert mini.graph() is mini.graph()
    with pytest.raises(nx.NetworkXError):
        mini.graph().add_edge("a", "e")


def test_with_ports_and_endpoints(mini: Topology) -> None:
    with pytest.raises(ValueError, match="no port"):
        _ = mini.node("a").endpoint
    assert mini.node("e").endpoint == "tcp://127.0.0.1:5702"
    bound = mini.with_ports({"a": 6001, "b": 6002}, host="0.0.0.0")
    assert bound.node("a").endpoint == "tcp://0.0.0.0:6001"
    assert bound.node("c").port is None
    assert mini.node("a").port is None  # the original is unchanged
    assert bound.edges == mini.edges
    with pytest.raises(ValueError, match="both bind"):
        mini.with_ports({"a": 5702})
    with pytest.raises(ValueError, match="1..65535"):
        mini.with_ports({"a": 0})
    with pytest.raises(KeyError):
        mini.with_ports({"zz": 6000})


def test_generated_spec_with_defaults_and_node_tables() -> None:
    data = {
        "name": "g",
        "generator": {"kind": "path", "n": 3, "prefix": "p"},
        "defaults": {"modalities": ["text"], "tasks": ["engagement"], "privacy": "gdpr"},
        "nodes": [{"id": "p1", "role": "instructor", "modalities": ["text", "image"]}],
    }
    topology = parse_topology(data, "g.toml")
    assert topology.ids() == ["p0", "p1", "p2"]
    assert topology.edges == (("p0", "p1"), ("p1", "p2"))
    p0, p1 = topology.node("p0"), topology.node("p1")
    assert (p0.role, p0.modalities, p0.tasks, p0.privacy) == (
        "student",
        ("text",),
        ("engagement",),
        "gdpr",
    )
    assert (p1.role, p1.modalities, p1.privacy) == ("instructor", ("image", "text"), "gdpr")


@pytest.mark.parametrize(
    ("kind", "params", "nodes", "edges"),
    [
        ("cycle", {"n": 5}, 5, 5),
        ("path", {"n": 5}, 5, 4),
        ("star", {"n": 5}, 5, 4),
        ("complete", {"n": 4}, 4, 6),
        ("torus", {"rows": 3, "cols": 4}, 12, 24),
        ("watts_strogatz", {"n": 10, "k": 4, "p": 0.2, "seed": 1}, 10, 20),
        ("random_regular", {"n": 8, "d": 3, "seed": 1}, 8, 12),
        ("erdos_renyi", {"n": 6, "p": 1, "seed": 0}, 6, 15),
    ],
)
def test_every_generator(kind: str, params: dict, nodes: int, edges: int) -> None:
    topology = parse_topology({"name": kind, "generator": {"kind": kind, **params}}, "x.toml")
    assert len(topology.nodes) == nodes
    assert len(topology.edges) == edges
    assert nx.is_connected(topology.graph())


# ----------------------------------------------------------------------------- package layout

PACKAGE = Path(__file__).resolve().parent.parent / "m3tgossip"


def _imported(path: Path) -> set[str]:
    """The m3tgossip modules a file imports (`from m3tgossip.x import y` counts m3tgossip.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return {n for n in names if n.split(".")[0] == "m3tgossip"}


def test_topology_modules_import_siblings_by_path_without_cycles() -> None:
    modules = {
        f"m3tgossip.topology.{p.stem}": _imported(p)
        for p in (PACKAGE / "topology").glob("*.py")
        if p.stem != "__init__"
    }
    siblings = {m: {i for i in imports if i in modules} for m, imports in modules.items()}
    for module, imports in modules.items():
        assert "m3tgossip.topology" not in imports, module
        assert not {i for i in imports if i.startswith("m3tgossip.topology.")} - set(modules)

    def reaches(start: str, seen: set[str]) -> set[str]:
        for nxt in siblings[start] - seen:
            seen.add(nxt)
            reaches(nxt, seen)
        return seen

    for module in modules:
        assert module not in reaches(module, set()), f"{module} imports itself through a cycle"
    for path in (PACKAGE / "consensus").glob("*.py"):
        assert not any(i.startswith("m3tgossip.topology") for i in _imported(path)), path


# ----------------------------------------------------------------------------- check report


def test_check_report_numbers_and_text(mini: Topology) -> None:
    report = check_report(mini, target_error=1e-3)
    json.dumps(report)
    assert report["edges"] == 5
    assert report["diameter"] == 3
    assert report["mh_slem"] == pytest.approx(1.0 - report["spectral_gap"])
    assert 0.0 < report["mh_slem"] < 1.0
    assert report["predicted_rounds"] > 0
    assert [n["degree"] for n in report["nodes"]] == [2, 2, 2, 3, 1]
    text_encoder = report["components"]["encoder.text"]
    assert text_encoder["holders"] == ["a", "c", "d"]
    assert text_encoder["connected"]
    text = format_report(report)
    for expected in ("mini", "encoder.text", "head.engagement", "SLEM", "0.001"):
        assert expected in text


def test_check_report_warns_about_split_and_lone_holders() -> None:
    data = {
        "name": "split",
        "edges": [["a", "b"], ["b", "c"]],
        "nodes": [
            {"id": "a", "modalities": ["text"]},
            {"id": "b", "modalities": ["tabular"], "tasks": ["stress"]},
            {"id": "c", "modalities": ["text"]},
        ],
    }
    report = check_report(parse_topology(data, "split.toml"))
    text = report["components"]["encoder.text"]
    assert text["connected"] is False
    assert text["predicted_rounds"] is None
    assert report["components"]["head.stress"]["predicted_rounds"] == 0
    warnings = "\n".join(report["warnings"])
    assert "encoder.text" in warnings and "a | c" in warnings
    assert "only b holds it" in warnings
    assert "task stress needs signal" in warnings
    assert "warnings:" in format_report(report)


# ----------------------------------------------------------------------------- bad specs


def _explicit(top: str = "", edges: str = '[["a", "b"], ["b", "c"]]', b: str = "") -> str:
    return (
        f'name = "t"\n{top}\nedges = {edges}\n'
        f'[[nodes]]\nid = "a"\n[[nodes]]\nid = "b"\n{b}\n[[nodes]]\nid = "c"\n'
    )


def _generated(generator: str, tail: str = "") -> str:
    return f'name = "g"\n[generator]\n{generator}\n{tail}'


BAD_SPECS = [
    # (case, spec text, entry the message must name, words of the problem)
    ("syntax", 'name = "t"\nedges = [["a" "b"]]', "TOML syntax", "line 2"),
    ("no-name", _explicit().replace('name = "t"', ""), "name", "non-empty"),
    ("top-typo", _explicit(top='descripton = "x"'), "descripton", 'did you mean "description"'),
    ("both", _explicit() + '[generator]\nkind = "cycle"\nn = 3\n', "edges/generator", "both"),
    ("neither", 'name = "t"\n[[nodes]]\nid = "a"\n', "edges/generator", "neither"),
    ("node-typo", _explicit(b='modalites = ["text"]'), 'nodes[1] (id "b").modalites', "did you"),
    ("no-id", _explicit(b="").replace('id = "b"', 'role = "student"'), "nodes[1]", "`id`"),
    ("bad-id", _explicit().replace('"c"', '"c c"'), 'nodes[2] (id "c c")', "an id is"),
    ("dup-id", _explicit().replace('id = "c"', 'id = "a"'), 'nodes[2] (id "a")', "duplicate"),
    ("self-loop", _explicit(edges='[["a", "b"], ["b", "b"]]'), 'edges[1] ["b", "b"]', "self-loop"),
    ("dup-edge", _explicit(edges='[["a", "b"], ["b", "a"]]'), 'edges[1] ["b", "a"]', "duplicate"),
    ("edge-id", _explicit(edges='[["a", "b"], ["b", "x"]]'), 'edges[1] ["b", "x"]', '"x"'),
    ("edge-shape", _explicit(edges='[["a", "b"], ["c"]]'), 'edges[1] ["c"]', "pair"),
    ("disconnected", _explicit(edges='[["a", "b"]]'), "edges", "2 parts: a, b | c"),
    ("modality", _explicit(b='modalities = ["video"]'), '(id "b").modalities', '"video"'),
    ("dup-modality", _explicit(b='modalities = ["text", "text"]'), '(id "b").modalities', "twice"),
    ("no-modality", _explicit(b="modalities = []"), '(id "b").modalities', "at least one"),
    ("task", _explicit(b='tasks = ["At-Risk"]'), '(id "b").tasks', '"At-Risk"'),
    ("role", _explicit(b='role = "teacher"'), '(id "b").role', "'teacher'"),
    ("compute", _explicit(b='compute = "gpu"'), '(id "b").compute', "full, lite"),
    ("privacy", _explicit(b='privacy = "hipaa"'), '(id "b").privacy', "ferpa"),
    ("port-range", _explicit(b="port = 70000"), '(id "b").port', "1..65535"),
    ("port-type", _explicit(b='port = "5701"'), '(id "b").port', "integer"),
    ("host", _explicit(b='host = "a b"'), '(id "b").host', "host"),
    (
        "port-clash",
        _explicit(b="port = 5701").replace('id = "c"', 'id = "c"\nport = 5701'),
        'nodes[2] (id "c")',
        'already used by nodes[1] (id "b")',
    ),
    ("key-length", _explicit(b='public_key = "abc"'), '(id "b").public_key', "40 characters"),
    ("key-chars", _explicit(b=f'public_key = "{"~" * 40}"'), '(id "b").public_key', "Z85"),
    (
        "key-shared",
        _explicit(b=f"public_key = '{KEY_B}'") + f"public_key = '{KEY_B}'\n",
        'nodes[2] (id "c").public_key',
        "same key as nodes[1]",
    ),
    ("local", _explicit(b='local = ["head.stress"]'), '(id "b").local', "not a component"),
    ("gen-kind", _generated('kind = "hypercube"\nn = 4'), "generator.kind", "'hypercube'"),
    ("gen-missing", _generated('kind = "cycle"'), "generator.n", "needs `n`"),
    ("gen-typo", _generated('kind = "cycle"\nn = 4\nseeds = 1'), "generator.seeds", "unknown"),
    ("gen-small", _generated('kind = "cycle"\nn = 2'), "generator.n", "3..10000"),
    ("gen-p", _generated('kind = "erdos_renyi"\nn = 4\np = 2\nseed = 1'), "generator.p", "[0, 1]"),
    ("gen-seedless", _generated('kind = "erdos_renyi"\nn = 4\np = 0.5'), "generator.seed", "needs"),
    (
        "gen-disconnected",
        _generated('kind = "erdos_renyi"\nn = 12\np = 0.3\nseed = 2'),
        "generator.seed",
        "seed=2 is disconnected",
    ),
    (
        "gen-k",
        _generated('kind = "watts_strogatz"\nn = 8\nk = 3\np = 0.1\nseed = 1'),
        "generator.k",
        "even",
    ),
    ("gen-d", _generated('kind = "random_regular"\nn = 5\nd = 3\nseed = 1'), "generator.d", "even"),
    ("gen-torus", _generated('kind = "torus"\nrows = 2\ncols = 4'), "generator.rows", "3.."),
    (
        "gen-node",
        _generated('kind = "cycle"\nn = 4', '[[nodes]]\nid = "x9"\n'),
        'nodes[0] (id "x9")',
        "no such node",
    ),
    (
        "defaults-port",
        _generated('kind = "cycle"\nn = 4', "[defaults]\nport = 1\n"),
        "defaults.port",
        "per node",
    ),
    (
        "defaults-value",
        _generated('kind = "cycle"\nn = 4', '[defaults]\nmodalities = ["smell"]\n'),
        'defaults.modalities (for node "n0")',
        '"smell"',
    ),
    ("no-nodes", 'name = "t"\nedges = []\n', "nodes", "must list"),
    ("speed-zero", _explicit(b="speed = 0"), '(id "b").speed', "outside (0, 1]"),
    ("speed-high", _explicit(b="speed = 2"), '(id "b").speed', "outside (0, 1]"),
    ("speed-nan", _explicit(b="speed = nan"), '(id "b").speed', "outside (0, 1]"),
    ("speed-type", _explicit(b='speed = "slow"'), '(id "b").speed', "a number in (0, 1]"),
    ("speed-bool", _explicit(b="speed = true"), '(id "b").speed', "a number in (0, 1]"),
    ("bandwidth", _explicit(b="bandwidth = -0.5"), '(id "b").bandwidth', "outside (0, 1]"),
    ("records-zero", _explicit(b="records = 0"), '(id "b").records', "not a positive number"),
    ("records-float", _explicit(b="records = 2.5"), '(id "b").records', "a whole number"),
    ("records-bool", _explicit(b="records = true"), '(id "b").records', "a whole number"),
    (
        "defaults-speed",
        _generated('kind = "cycle"\nn = 4', "[defaults]\nspeed = 1.5\n"),
        'defaults.speed (for node "n0")',
        "outside (0, 1]",
    ),
    (
        "speed-dynamics",
        _generated(
            'kind = "cycle"\nn = 4',
            '[[nodes]]\nid = "n2"\nspeed = 0.5\n[dynamics]\nkind = "one-peer-exponential"\n',
        ),
        'nodes[0] (id "n2").speed',
        "static graph",
    ),
    (
        "speed-cancel",
        _explicit(b='single_learner = "cancel"\nspeed = 0.5'),
        '(id "b").speed',
        'single_learner = "cancel"',
    ),
    (
        "cancel-beside-straggler",
        _explicit(b='single_learner = "cancel"') + "bandwidth = 0.5\n",
        'nodes[1] (id "b").single_learner',
        "next to c, which is declared slow",
    ),
]


@pytest.mark.parametrize(
    ("case", "text", "entry", "problem"), BAD_SPECS, ids=[case[0] for case in BAD_SPECS]
)
def test_bad_spec_names_file_and_entry(
    tmp_path: Path, case: str, text: str, entry: str, problem: str
) -> None:
    path = _write(tmp_path, f"bad-{case}.toml", text)
    with pytest.raises(ConfigError) as raised:
        load_topology(path)
    message = str(raised.value)
    assert message.startswith(str(path))
    assert entry in raised.value.entry
    assert problem in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nowhere.toml: no such topology file"):
        load_topology(tmp_path / "nowhere.toml")
