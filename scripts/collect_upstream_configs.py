"""Copy every version of the original TokenFlow's config files out of a clone, with provenance.

    python scripts/collect_upstream_configs.py --repo PATH/TO/TokenFlow [--out tests/data/upstream_configs]
    python scripts/collect_upstream_configs.py --repo PATH --check     # exit 1 if the folder differs

``--repo`` is a clone (or bare mirror) of https://github.com/omerbt/TokenFlow fetched with every ref,
pull requests included (``git fetch origin '+refs/pull/*/head:refs/pull/*/head'``). The script walks
the history of every ref and writes into ``--out``:

- ``<commit>-<name>.yaml``: each distinct version (blob) of ``configs/*.yaml``, named after the
  first commit that has it (oldest first, in topological order);
- ``keys.json``: every key any version of the scripts reads from a config (``config["..."]`` or
  ``self.config["..."]``, ``config.get("...")``, ``config.NAME`` of the cog predictor's namespace, ``opt.NAME`` and the
  ``--NAME`` flags of ``preprocess.py``), with the files and first commit that read it;
- ``README.md``: the provenance (repository, commit, refs, path, blob) and the MIT copyright.

``tests/test_upstream_configs.py`` loads each file through the CLI's config path and checks that
``tokenflow.config.from_mapping`` accepts every key of ``keys.json``.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

UPSTREAM = "https://github.com/omerbt/TokenFlow"
COPYRIGHT = "Copyright (c) 2023 Michal Geyer, Omer Bar-Tal, Shai Bagon, Tali Dekel"
CONFIG_PATH = re.compile(r"^configs/[^/]+\.ya?ml$")
SCRIPT_PATH = re.compile(r"^[^/]+\.py$")
# how a script reads a config key (the names of model configs, e.g. scheduler.config.clip_sample, are
# attributes of another object: the look-behind keeps them out)
KEY_READS = (   # ``config`` itself or ``self.config`` (the TokenFlow class keeps the dict there)
    re.compile(r"""(?<![\w.])(?:self\.)?config\[\s*["'](\w+)["']\s*\]"""),
    re.compile(r"""(?<![\w.])(?:self\.)?config\.get\(\s*["'](\w+)["']"""),
    re.compile(r"""(?<![\w.])(?:self\.)?config\.(?!yaml\b|get\b)(\w+)"""),
    re.compile(r"""(?<![\w.])opt\.(\w+)"""),
    re.compile(r"""add_argument\(\s*["']--(\w+)["']"""),
)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def commits_oldest_first(repo: Path) -> List[str]:
    return git(repo, "rev-list", "--all", "--topo-order", "--reverse").split()


def tree(repo: Path, commit: str) -> Dict[str, str]:
    """path -> blob id of the files of ``commit``."""
    out = {}
    for line in git(repo, "ls-tree", "-r", commit).splitlines():
        meta, path = line.split("\t", 1)
        out[path] = meta.split()[2]
    return out


def refs_having(repo: Path, path: str, blob: str) -> List[str]:
    """The refs whose tip has ``blob`` at ``path``."""
    names = git(repo, "for-each-ref", "--format=%(refname)").split()
    return [name for name in names if tree_blob(repo, name, path) == blob]


def tree_blob(repo: Path, ref: str, path: str) -> str:
    try:
        return git(repo, "rev-parse", "-q", "--verify", f"{ref}:{path}").strip()
    except subprocess.CalledProcessError:
        return ""


def collect(repo: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    versions: Dict[Tuple[str, str], str] = {}   # (path, blob) -> first commit
    keys: Dict[str, Dict] = {}
    scanned = set()
    for commit in commits_oldest_first(repo):
        short = git(repo, "rev-parse", "--short=7", commit).strip()
        for path, blob in tree(repo, commit).items():
            if CONFIG_PATH.match(path):
                versions.setdefault((path, blob), commit)
            elif SCRIPT_PATH.match(path) and blob not in scanned:
                scanned.add(blob)
                text = git(repo, "cat-file", "-p", blob)
                for pattern in KEY_READS:
                    for key in pattern.findall(text):
                        entry = keys.setdefault(key, {"first_commit": short, "read_by": []})
                        if path not in entry["read_by"]:
                            entry["read_by"].append(path)
    rows = []
    for (path, blob), commit in versions.items():
        short = git(repo, "rev-parse", "--short=7", commit).strip()
        name = f"{short}-{Path(path).name}"
        (out / name).write_bytes(subprocess.run(["git", "-C", str(repo), "cat-file", "-p", blob],
                                                check=True, capture_output=True).stdout)
        rows.append((name, commit, path, blob, refs_having(repo, path, blob)))
    (out / "keys.json").write_text(json.dumps({k: {**v, "read_by": sorted(v["read_by"])} for k, v in sorted(keys.items())},
                                              indent=1) + "\n")
    (out / "README.md").write_text(readme(rows))


def readme(rows) -> str:
    lines = [
        "# Config files of the original TokenFlow implementation",
        "",
        f"Copied unchanged from {UPSTREAM} (MIT License, {COPYRIGHT}) by",
        "`scripts/collect_upstream_configs.py`, which walks every ref of a clone (pull requests",
        "included), writes each distinct version of `configs/*.yaml` as `<commit>-<name>.yaml` (the",
        "first commit that has it) and `keys.json` (every key a version of the scripts reads).",
        "Rerun it with `--check` against a clone to verify this folder.",
        "",
        "| file | commit | path | blob | refs whose tip has it |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, commit, path, blob, refs in sorted(rows):
        lines.append(f"| `{name}` | {commit} | `{path}` | {blob[:12]} | {', '.join(refs) or '(none: history only)'} |")
    lines += ["", "The original's license:", "", "    MIT License", "", f"    {COPYRIGHT}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, type=Path, help="a clone or bare mirror of omerbt/TokenFlow")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/upstream_configs")
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)
    if not args.check:
        collect(args.repo, args.out)
        return 0
    with tempfile.TemporaryDirectory() as fresh:
        collect(args.repo, Path(fresh))
        compared = filecmp.dircmp(fresh, args.out)
        differ = compared.left_only + compared.right_only + compared.diff_files
        if differ:
            print(f"{args.out} differs from the clone: {', '.join(sorted(differ))}", file=sys.stderr)
            return 1
    print(f"{args.out} matches {args.repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
