"""The `m3tgossip data`, `predict`, `export` and `explain` subcommands (parsers and handlers).

    m3tgossip data check DIR [--json]
    m3tgossip data example --topology FILE --out DIR [--seed 0] [--records 240] [--alpha 0.5]
    m3tgossip data from-oulad OULAD_DIR --topology FILE --out DIR [--seed 0] [--max-students N]
    m3tgossip predict --state-dir DIR --data DIR2 --out FILE
    m3tgossip export --state-dir DIR --out DIR2
    m3tgossip explain --state-dir DIR --data DIR2 --out OUT [--record ID] [--max-records N]

Nothing here imports torch until a command that needs it runs. Bad input raises ConfigError,
which `m3tgossip.cli` prints without a traceback (exit code 2).
"""

from __future__ import annotations

import argparse
import json

from m3tgossip.errors import ConfigError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The `data`, `predict`, `export` and `explain` subcommands."""
    data = sub.add_parser("data", help="check and write node data folders (docs/data.md)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="validate a data folder and count what it holds")
    check.add_argument("folder")
    check.add_argument("--json", action="store_true", help="print the counts as JSON")
    example = data_sub.add_parser(
        "example", help="write the built-in federation as one data folder per node"
    )
    oulad = data_sub.add_parser(
        "from-oulad", help="partition an OULAD folder into one data folder per node"
    )
    oulad.add_argument("oulad", metavar="OULAD_DIR", help="folder of OULAD's seven CSV files")
    oulad.add_argument("--max-students", type=int, help="only the first N students")
    for p in (example, oulad):
        p.add_argument("--topology", required=True, help="topology spec (TOML)")
        p.add_argument("--out", required=True, metavar="DIR", help="one folder per node in DIR")
        p.add_argument("--seed", type=int, default=0, help="federation seed (default 0)")
    example.add_argument("--records", type=int, default=240, help="records per node (240)")
    example.add_argument("--alpha", type=float, default=0.5, help="label skew (0.5)")
    predict = sub.add_parser("predict", help="per-record predictions of a trained edu node")
    predict.add_argument("--state-dir", required=True, help="the node's state folder")
    predict.add_argument("--data", required=True, help="data folder of the records to predict")
    predict.add_argument("--out", required=True, metavar="FILE", help="predictions CSV")
    export = sub.add_parser("export", help="write a trained edu node's adapters (PEFT format)")
    export.add_argument("--state-dir", required=True, help="the node's state folder")
    export.add_argument("--out", required=True, metavar="DIR2", help="export folder")
    explain = sub.add_parser(
        "explain", help="modality attributions of a trained edu node (Shapley, JSON and PNG)"
    )
    explain.add_argument("--state-dir", required=True, help="the node's state folder")
    explain.add_argument("--data", required=True, help="data folder of the records to explain")
    explain.add_argument(
        "--out", required=True, metavar="OUT", help="folder for explain.json and explain.png"
    )
    explain.add_argument("--record", metavar="ID", help="also explain this record's predictions")
    explain.add_argument(
        "--max-records", type=int, metavar="N", help="a seeded sample of N records (all)"
    )
    explain.add_argument(
        "--view",
        choices=("institution", "instructor", "student"),
        help="the role view (default: the node's role)",
    )
    explain.add_argument(
        "--group-by",
        metavar="ATTR",
        help="group the view by this attribute of learners.csv, `learner` or `node`",
    )
    explain.add_argument(
        "--repeats", type=int, default=3, help="shuffles per modality in the permutation check"
    )
    explain.add_argument("--seed", type=int, default=0, help="sample and shuffle seed (0)")


def _data(args: argparse.Namespace) -> int:
    if args.data_command == "check":
        from m3tgossip.edu.data.check import describe, format_description
        from m3tgossip.edu.data.folder import read_folder

        report = describe(read_folder(args.folder))
        print(json.dumps(report, indent=2) if args.json else format_description(report))
        return 0
    from m3tgossip.topology import load_topology

    topology = load_topology(args.topology)
    if args.data_command == "example":
        from m3tgossip.edu.data.config import DataConfig
        from m3tgossip.edu.data.example import write_example

        try:
            config = DataConfig(records=args.records, alpha=args.alpha, seed=args.seed)
        except ValueError as exc:
            raise ConfigError("data example", "--records/--alpha", str(exc)) from None
        paths = write_example(list(topology.nodes), args.out, config)
    else:
        from m3tgossip.edu.data.oulad_partition import write_oulad

        written = write_oulad(
            args.oulad, topology, args.out, seed=args.seed, max_students=args.max_students
        )
        paths = list(written.values())
    for path in paths:
        print(f"wrote {path}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from m3tgossip.edu.predict import predict

    result = predict(args.state_dir, args.data, args.out)
    accuracy = ", ".join(f"{t} {a:.3f}" for t, a in result.accuracy.items())
    print(
        f"{result.node}: {result.records} records x {len(result.tasks)} tasks -> {result.path}"
        + (
            f" ({result.skipped} without any of the node's modalities skipped)"
            if result.skipped
            else ""
        )
        + (f"; accuracy on the labelled ones: {accuracy}" if accuracy else "")
    )
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from m3tgossip.edu.export import export

    print(f"wrote {export(args.state_dir, args.out)}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from m3tgossip.edu.explain_report import explain

    result = explain(
        args.state_dir,
        args.data,
        args.out,
        record=args.record,
        max_records=args.max_records,
        view=args.view,
        group_by=args.group_by,
        repeats=args.repeats,
        seed=args.seed,
    )
    report = result.report
    print(
        f"{report['node']}: {report['records']} records, {len(report['modalities'])} modalities, "
        f"{report['coalitions']} coalitions -> {result.json_path}"
        + (f", {result.png_path}" if result.png_path else "")
    )
    for task, summary in report["tasks"].items():
        shares = summary["shares"]
        text = (
            ", ".join(f"{m} {s:.2f}" for m, s in shares.items())
            if shares
            else f"no shares ({summary['note']})"
        )
        rho = summary["permutation"]["spearman"]
        print(
            f"  {task}: {text}; total {summary['total']:.4f} nats"
            + (f"; Spearman vs permutation {rho:.2f}" if rho is not None else "")
        )
    for note in result.notes:
        print(f"note: {note}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the parsed `data`, `predict`, `export` or `explain` command; its exit code."""
    if args.command == "explain":
        return _explain(args)
    if args.command == "predict":
        return _predict(args)
    if args.command == "export":
        return _export(args)
    return _data(args)
