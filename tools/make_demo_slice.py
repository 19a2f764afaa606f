#!/usr/bin/env python
"""Extract the embedded demo's slice of Spider into ``kid/demo_data/``.

Writes ``kid/demo_data/spider_slice/`` in the layout the Spider loader expects::

    database/<db_id>/<db_id>.sqlite   byte-for-byte copies of the chosen databases
    train.json, heldout.json          Spider-format records (db_id, question, query, spider_train_index)
    tables.json                       Spider's tables.json restricted to the chosen databases

and ``kid/demo_data/README.md`` (attribution, license, what was selected and how).

Selection, all deterministic:

1. the examples of ``--dbs`` in Spider's ``train_spider.json`` (Spider's train split);
2. drop examples whose gold query fails to execute (read-only, time-limited, kid.evaluation);
3. keep the hardness levels in ``--hardness`` (Spider hardness computed from the SQL; the same
   filter for both splits);
4. drop examples whose normalised training target does not give the gold query's result under
   the Spider execution-accuracy semantics (a check on kid.sql_normalize; expected: none);
5. split per database into held-out and train by groups: every example with the same
   normalised SQL, or the same question, lands in the same split (Spider has about two
   paraphrased questions per query, so a per-question split would put the held-out answers in
   the training data); ``round(--heldout-fraction * groups)`` groups per database are held out,
   chosen by ``random.Random(--seed)``.

Run from the repository root: ``python tools/make_demo_slice.py`` (Spider from ``KID_SPIDER_DIR``
or ``../shared/data/spider``). The source directory is only read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kid.evaluation import evaluate_predictions, open_readonly, run_query, spider_hardness  # noqa: E402
from kid.evaluation.scoring import database_path  # noqa: E402
from kid.sql_normalize import normalize_sql  # noqa: E402

# Small schemas (2-3 tables, 7-12 columns: short CodeS prompts) and many easy/medium questions.
DEFAULT_DBS = ("manufactory_1", "student_1", "network_2", "movie_1", "allergy_1", "race_track")
DEFAULT_HARDNESS = ("easy", "medium")
DEFAULT_SEED = 0
DEFAULT_HELDOUT_FRACTION = 0.2
SLICE_NAME = "spider_slice"

SPIDER_CITATION = """\
Tao Yu, Rui Zhang, Kai Yang, Michihiro Yasunaga, Dongxu Wang, Zifan Li, James Ma, Irene Li, Qingning Yao,
Shanelle Roman, Zilin Zhang and Dragomir Radev. 2018. Spider: A Large-Scale Human-Labeled Dataset for Complex
and Cross-Domain Semantic Parsing and Text-to-SQL Task. In Proceedings of EMNLP 2018, pages 3911-3921.
https://yale-lily.github.io/spider"""


def default_spider_dir() -> Path:
    return Path(os.environ.get("KID_SPIDER_DIR", REPO.parent / "shared" / "data" / "spider"))


def _groups(examples: list[dict]) -> list[list[dict]]:
    """Examples joined when they share a normalised query or a question (union-find)."""
    parent = list(range(len(examples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, ex in enumerate(examples):
        for key in (("sql", ex["target"]), ("question", " ".join(ex["question"].lower().split()))):
            if key in first:
                parent[find(i)] = find(first[key])
            else:
                first[key] = i
    groups: dict[int, list[dict]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[find(i)].append(ex)
    return sorted(groups.values(), key=lambda g: g[0]["spider_train_index"])


def select(spider_dir: Path, dbs: tuple[str, ...], hardness: tuple[str, ...], seed: int, fraction: float):
    """The chosen examples split into (train, heldout), with the counts of what was dropped and why."""
    raw = json.loads((spider_dir / "train_spider.json").read_text(encoding="utf-8"))
    db_dir = spider_dir / "database"
    stats: dict = {
        "source_examples": Counter(),
        "gold_fails": [],
        "hardness_dropped": Counter(),
        "target_mismatch": [],
        "empty_gold": Counter(),
        "kept": Counter(),
    }
    candidates = []
    conns = {db: open_readonly(database_path(db_dir, db)) for db in dbs}
    try:
        for index, ex in enumerate(raw):
            db = ex["db_id"]
            if db not in conns:
                continue
            stats["source_examples"][db] += 1
            result = run_query(conns[db], ex["query"], timeout_s=10.0)
            if not result.ok:
                stats["gold_fails"].append((index, db, ex["query"], result.error))
                continue
            level = spider_hardness(ex["query"])
            if level not in hardness:
                stats["hardness_dropped"][level] += 1
                continue
            candidates.append(
                {
                    "db_id": db,
                    "question": " ".join(ex["question"].split()),
                    "query": ex["query"],
                    "spider_train_index": index,
                    "target": normalize_sql(ex["query"]),
                    "hardness": level,
                    "empty": not result.rows,
                }
            )
    finally:
        for conn in conns.values():
            conn.close()

    # The training target must be EX-equal to the gold query (scored with the real evaluator).
    report = evaluate_predictions(
        [c["target"] for c in candidates],
        [c["query"] for c in candidates],
        [c["db_id"] for c in candidates],
        db_dir,
        progress=False,
    )
    kept = []
    for c, r in zip(candidates, report.examples):
        if r.correct:
            kept.append(c)
        else:
            stats["target_mismatch"].append((c["spider_train_index"], c["db_id"], c["query"], c["target"], r.error))

    rng = random.Random(seed)
    train, heldout = [], []
    for db in sorted(dbs):
        groups = _groups([c for c in kept if c["db_id"] == db])
        order = list(range(len(groups)))
        rng.shuffle(order)
        n_held = max(1, round(fraction * len(groups)))
        held = set(order[:n_held])
        for i, group in enumerate(groups):
            (heldout if i in held else train).extend(group)
    train.sort(key=lambda c: c["spider_train_index"])
    heldout.sort(key=lambda c: c["spider_train_index"])
    for split, rows in (("train", train), ("heldout", heldout)):
        for c in rows:
            stats["kept"][(split, c["db_id"])] += 1
            stats["kept"][(split, c["hardness"])] += 1
            stats["empty_gold"][split] += c["empty"]
    return train, heldout, stats


def _record(c: dict) -> dict:
    return {
        "db_id": c["db_id"],
        "question": c["question"],
        "query": c["query"],
        "spider_train_index": c["spider_train_index"],
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _range(values: list[int]) -> str:
    return f"{min(values)}-{max(values)}" if min(values) != max(values) else str(min(values))


def write_readme(path: Path, args, train, heldout, stats, tables_entries, command: str) -> None:
    dbs = sorted(args.dbs)
    slice_dir = path.parent / SLICE_NAME
    files = sorted(p for p in slice_dir.rglob("*") if p.is_file())
    total_bytes = sum(p.stat().st_size for p in files)
    n_tables = [len(t["table_names_original"]) for t in tables_entries]
    n_columns = [len(t["column_names_original"]) - 1 for t in tables_entries]  # minus "*"
    lines = [
        "# Demo data: a small slice of Spider",
        "",
        "`spider_slice/` is derived from **Spider** (Yu et al., EMNLP 2018) and, like Spider, is licensed under the",
        "**Creative Commons Attribution-ShareAlike 4.0 International license (CC BY-SA 4.0)**,",
        "https://creativecommons.org/licenses/by-sa/4.0/ . (The code of this repository is Apache-2.0; the data in",
        "this directory is CC BY-SA 4.0.)",
        "",
        "Spider is the work of its authors; cite it as:",
        "",
        "```",
        SPIDER_CITATION,
        "```",
        "",
        "Changes made to Spider (and nothing else): a subset of the training examples (`train_spider.json`, the",
        "7,000 human-written training examples) is split into `train.json` and `heldout.json`, each record reduced",
        "to `db_id`, `question` (whitespace collapsed), `query` and `spider_train_index` (the position in",
        "`train_spider.json`, 0-based); `tables.json` is Spider's, restricted to the chosen databases; the SQLite",
        "files are unmodified copies. It is the data of `kid demo`, which runs offline in minutes on a CPU.",
        "",
        "## How it was made",
        "",
        "```bash",
        command,
        "```",
        "",
        "run from the repository root on Spider's `train_spider.json`, `tables.json` and `database/` (the copy",
        "described in the project's data README; its `train_spider.json` is an older Spider release whose SQL",
        "spacing differs slightly from the newest one). The script is deterministic; running it again gives the",
        "same files.",
        "",
        f"1. Databases ({len(dbs)}, all from Spider's *train* split):",
        "   " + ", ".join(f"`{d}`" for d in dbs) + ".",
        f"   Chosen by hand for small schemas ({_range(n_tables)} tables, {_range(n_columns)} columns, so the",
        "   CodeS-style prompts of `kid.prompts.build_prompt` stay short), many easy and medium questions, and",
        f"   small SQLite files. {sum(stats['source_examples'].values())} training examples use them.",
        f"2. Examples whose gold query fails to execute (read-only, kid.evaluation) are dropped: "
        f"{len(stats['gold_fails'])}.",
        "3. **Hardness filter, the same for both splits:** only Spider hardness "
        + " and ".join(f"`{h}`" for h in args.hardness)
        + " is kept",
        "   (computed from the SQL by `kid.evaluation.spider_hardness`: the data file has no parsed `sql` field).",
        "   Dropped: " + (", ".join(f"{n} {h}" for h, n in sorted(stats["hardness_dropped"].items())) or "none") + ".",
        "   A tiny model trained for a few minutes is not expected to get harder queries right; they would",
        "   mostly lower every method's score alike. The demo's accuracies are therefore on these hardness levels",
        "   only, and not comparable with figures on the full Spider sets.",
        "4. Examples whose normalised training target (`kid.sql_normalize.normalize_sql`) does not give the gold",
        f"   result under Spider's execution-accuracy semantics are dropped: {len(stats['target_mismatch'])}.",
        "5. In-domain split, per database, by groups: examples with the same normalised SQL or the same question",
        "   are one group (Spider asks most queries twice, in two wordings) and go to the same split, so no",
        f"   held-out question or gold query appears in `train.json`. `round({args.heldout_fraction} x groups)`",
        f"   groups per database are held out, drawn with `random.Random({args.seed})` over the databases in",
        "   sorted order. The same databases appear in both splits (a tiny model cannot do cross-database).",
        "",
        "## Contents",
        "",
        "| database | train | held-out | SQLite bytes |",
        "|---|---:|---:|---:|",
    ]
    for db in dbs:
        size = (slice_dir / "database" / db / f"{db}.sqlite").stat().st_size
        lines.append(f"| `{db}` | {stats['kept'][('train', db)]} | {stats['kept'][('heldout', db)]} | {size:,} |")
    lines += [
        f"| **total** | **{len(train)}** | **{len(heldout)}** | |",
        "",
        "By hardness: train "
        + ", ".join(f"{stats['kept'][('train', h)]} {h}" for h in args.hardness)
        + "; held-out "
        + ", ".join(f"{stats['kept'][('heldout', h)]} {h}" for h in args.hardness)
        + ".",
        f"Gold queries with an empty result (any prediction with an empty result matches them): train "
        f"{stats['empty_gold']['train']}, held-out {stats['empty_gold']['heldout']}.",
        f"Slice size on disk: {total_bytes:,} bytes in {len(files)} files.",
        "",
        "SHA-256 of the SQLite files (identical to Spider's):",
        "",
        "```",
    ]
    for db in dbs:
        lines.append(f"{_sha256(slice_dir / 'database' / db / f'{db}.sqlite')}  database/{db}/{db}.sqlite")
    lines += ["```", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spider-dir", type=Path, default=default_spider_dir(), help="Spider data (read only)")
    parser.add_argument("--out", type=Path, default=REPO / "kid" / "demo_data", help="output directory")
    parser.add_argument("--dbs", nargs="+", default=list(DEFAULT_DBS))
    parser.add_argument(
        "--hardness", nargs="+", default=list(DEFAULT_HARDNESS), choices=["easy", "medium", "hard", "extra"]
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--heldout-fraction", type=float, default=DEFAULT_HELDOUT_FRACTION)
    args = parser.parse_args(argv)
    args.dbs, args.hardness = tuple(args.dbs), tuple(args.hardness)

    spider_dir, out = args.spider_dir.resolve(), args.out.resolve()
    if out == spider_dir or spider_dir in out.parents:
        parser.error("--out must not be inside the Spider directory (it is read only)")
    tables = {t["db_id"]: t for t in json.loads((spider_dir / "tables.json").read_text(encoding="utf-8"))}
    for db in args.dbs:
        if db not in tables or not database_path(spider_dir / "database", db).is_file():
            parser.error(f"database {db!r} not found in {spider_dir}")

    train, heldout, stats = select(spider_dir, args.dbs, args.hardness, args.seed, args.heldout_fraction)

    slice_dir = out / SLICE_NAME
    if slice_dir.exists():
        shutil.rmtree(slice_dir)
    for db in sorted(args.dbs):
        dst = database_path(slice_dir / "database", db)
        dst.parent.mkdir(parents=True)
        shutil.copyfile(database_path(spider_dir / "database", db), dst)
    for name, rows in (("train.json", train), ("heldout.json", heldout)):
        (slice_dir / name).write_text(
            json.dumps([_record(c) for c in rows], indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    # Spider's order, restricted to the chosen databases.
    entries = [
        t for t in json.loads((spider_dir / "tables.json").read_text(encoding="utf-8")) if t["db_id"] in args.dbs
    ]
    (slice_dir / "tables.json").write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")

    command = "python tools/make_demo_slice.py --dbs " + " ".join(sorted(args.dbs))
    command += " --hardness " + " ".join(args.hardness)
    command += f" --seed {args.seed} --heldout-fraction {args.heldout_fraction}"
    write_readme(out / "README.md", args, train, heldout, stats, entries, command)

    print(f"wrote {slice_dir}: train {len(train)}, held-out {len(heldout)}")
    print(f"gold queries that fail to execute (dropped): {len(stats['gold_fails'])}")
    for index, db, query, error in stats["gold_fails"]:
        print(f"  #{index} {db}: {query} -> {error}")
    print(f"dropped by hardness: {dict(stats['hardness_dropped'])}")
    print(f"targets not EX-equal to gold (dropped): {len(stats['target_mismatch'])}")
    for item in stats["target_mismatch"]:
        print("  ", item)
    print(f"empty gold results: {dict(stats['empty_gold'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
