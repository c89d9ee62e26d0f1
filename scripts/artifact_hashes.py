"""sha256 of every file of every artifact under an artifact folder, as JSON, to compare two
runs file by file (e.g. before and after a refactor that must not change results):

    python scripts/artifact_hashes.py outputs/artifacts before.json
    ... change the code, run the same command into another folder ...
    python scripts/artifact_hashes.py other/artifacts after.json
    python scripts/artifact_hashes.py --compare before.json after.json

Keys are `<stage>/<key>/<file>`; manifest.json is left out (it holds timings). In a PPO
artifact's metrics.jsonl the wall-time fields (`time/*`) are left out of the hash, and in
rows.csv the run_id column (the artifact's own key); everything else is hashed as written.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
from pathlib import Path


def file_hash(path: Path) -> str:
    data = path.read_bytes()
    if path.name == "metrics.jsonl":  # wall times differ from run to run
        rows = [
            {k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in data.decode().splitlines()
            if line.strip()
        ]
        data = json.dumps(rows, sort_keys=True).encode()
    elif path.name == "rows.csv":  # run_id: the artifact's key, compared separately
        rows = list(csv.DictReader(io.StringIO(data.decode())))
        data = json.dumps([{k: v for k, v in r.items() if k != "run_id"} for r in rows]).encode()
    return hashlib.sha256(data).hexdigest()


def artifact_hashes(root: Path) -> dict[str, str]:
    out = {}
    for manifest in sorted(root.rglob("manifest.json")):
        folder = manifest.parent
        stage = json.loads(manifest.read_text()).get("stage", folder.parent.name)
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.name != "manifest.json":
                out[f"{stage}/{folder.name}/{path.relative_to(folder)}"] = file_hash(path)
    return out


def compare(before: dict[str, str], after: dict[str, str]) -> int:
    """Print files that differ (keys aside) and stages whose keys changed; 1 if any file differs."""

    def by_file(hashes):
        return {
            (k.split("/", 2)[0], k.split("/", 2)[2]): (v, k.split("/", 2)[1])
            for k, v in hashes.items()
        }

    a, b = by_file(before), by_file(after)
    differ = sorted(f for f in set(a) | set(b) if a.get(f, ("",))[0] != b.get(f, ("",))[0])
    keys = sorted({f[0] for f in set(a) & set(b) if a[f][1] != b[f][1]})
    print(f"{len(a)} files before, {len(b)} after; differing: {differ or 'none'}")
    print(f"stages whose keys changed: {keys or 'none'}")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "paths", nargs=2, help="ARTIFACT_DIR OUT.json, or with --compare A.json B.json"
    )
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args()
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.paths)
        return compare(a, b)
    hashes = artifact_hashes(Path(args.paths[0]))
    Path(args.paths[1]).write_text(json.dumps(hashes, indent=1, sort_keys=True))
    print(f"{len(hashes)} files -> {args.paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
