"""The automatic document cache through `qjl ask` and `qjl cache list/prune/clear` (issue 12).

The fake model (conftest.fake_model) for the CLI's logic; one slow test runs two real `qjl` processes at once.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qjl.errors import CacheFileError
from qjl_cli.main import ExitCode
from conftest import invoke

REPO = Path(__file__).resolve().parents[1]
Q = "Who is the general manager?"


@pytest.fixture(autouse=True)
def _cache_on(qjl_home, monkeypatch):
    monkeypatch.setenv("QJL_CACHE", "1")
    monkeypatch.delenv("QJL_CACHE_MAX", raising=False)
    return qjl_home



def ask(fake_model, *args):
    """`qjl ask ...` with fresh call records; the result after checking it answered."""
    fake_model.calls.clear()
    result = invoke("ask", *args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert set(result.stdout.splitlines()) == {"The general manager is Ana Ruiz."}
    return result


def entries(home: Path) -> list[Path]:
    folder = home / "documents"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("qjl: warning:")]


def test_miss_then_hit(fake_model, doc, qjl_home):
    first = ask(fake_model, doc, Q)
    assert "prefill" in fake_model.calls and "cache: stored" in first.stderr
    [entry] = entries(qjl_home)
    assert entry.name.endswith(".qjl") and fake_model.calls["save_cache"]["source_info"]["name"] == "report.txt"
    second = ask(fake_model, doc, Q)
    assert "prefill" not in fake_model.calls and "cache: hit" in second.stderr
    assert fake_model.calls["load_cache"]["path"] == str(entry)
    assert "loaded from the document cache" in second.stderr and entries(qjl_home) == [entry]
    ask(fake_model, doc, "-q", Q, "-q", "When?")  # more questions: the same prefix, a hit
    assert "prefill" not in fake_model.calls and fake_model.calls["load_cache"]["questions"] == [Q, "When?"]


def test_no_cache_and_qjl_cache_0_neither_use_nor_store(fake_model, doc, qjl_home, monkeypatch):
    ask(fake_model, doc, Q, "--no-cache")
    assert entries(qjl_home) == [] and "save_cache" not in fake_model.calls
    ask(fake_model, doc, Q)
    result = ask(fake_model, doc, Q, "--no-cache")
    assert "prefill" in fake_model.calls and "cache:" not in result.stderr
    monkeypatch.setenv("QJL_CACHE", "0")
    ask(fake_model, doc, Q)
    assert "prefill" in fake_model.calls and "cache_key" not in fake_model.calls


def test_a_corrupted_entry_is_rebuilt_with_one_warning(fake_model, doc, qjl_home):
    ask(fake_model, doc, Q)
    [entry] = entries(qjl_home)
    entry.write_bytes(b"\x00garbage")
    result = ask(fake_model, doc, Q)
    assert "prefill" in fake_model.calls and "cache: stored" in result.stderr
    assert len(warnings(result)) == 1 and "unusable" in warnings(result)[0]
    assert json.loads(entry.read_text())["document_tokens"] > 0  # rebuilt under the same name
    assert "cache: hit" in ask(fake_model, doc, Q).stderr


def test_a_changed_document_another_kv_or_model_miss(fake_model, doc, qjl_home):
    ask(fake_model, doc, Q)
    doc.write_text(doc.read_text() + "It has 40 members.\n")
    assert "cache: stored" in ask(fake_model, doc, Q).stderr
    assert "cache: stored" in ask(fake_model, doc, Q, "--kv", "qjl").stderr
    fake_model.identity = "another-model"
    assert "cache: stored" in ask(fake_model, doc, Q).stderr
    assert len(entries(qjl_home)) == 4
    result = ask(fake_model, doc, Q, "--kv", "exact")  # only compressed caches have files
    assert "cache_key" not in fake_model.calls and "cache:" not in result.stderr and len(entries(qjl_home)) == 4


def test_truncation_is_part_of_the_key(fake_model, tmp_path, qjl_home):
    fake_model.context_length = 400
    long = tmp_path / "long.txt"
    long.write_text("word " * 500)
    ask(fake_model, long, Q, "--truncate", "head", "--max-new-tokens", "16")
    ask(fake_model, long, Q, "--truncate", "tail", "--max-new-tokens", "16")
    ask(fake_model, long, Q, "--truncate", "tail", "--max-new-tokens", "32")  # another limit
    assert "prefill" in fake_model.calls and len(entries(qjl_home)) == 3
    ask(fake_model, long, Q, "--truncate", "tail", "--max-new-tokens", "32")
    assert "prefill" not in fake_model.calls


def test_eviction_under_a_small_cap(fake_model, tmp_path, qjl_home, monkeypatch):
    docs = []
    for i in range(4):
        docs.append(tmp_path / f"d{i}.txt")
        docs[-1].write_text(f"Document number {i} names Ana Ruiz.")
    ask(fake_model, docs[0], Q)
    size = entries(qjl_home)[0].stat().st_size
    monkeypatch.setenv("QJL_CACHE_MAX", str(2 * size + size // 2))  # room for two
    for d in docs[1:]:
        ask(fake_model, d, Q)
    assert len(entries(qjl_home)) == 2
    ask(fake_model, docs[3], Q)
    assert "prefill" not in fake_model.calls  # the most recent stayed
    ask(fake_model, docs[0], Q)
    assert "prefill" in fake_model.calls  # the oldest went


def test_bad_cap_is_a_usage_error_before_the_model(fake_model, doc, monkeypatch):
    monkeypatch.setenv("QJL_CACHE_MAX", "lots")
    result = invoke("ask", doc, Q)
    assert result.exit_code == ExitCode.USAGE and "not a size" in result.stderr and "load" not in fake_model.calls


def test_an_unwritable_or_full_home_still_answers_with_one_warning(fake_model, doc, qjl_home):
    qjl_home.mkdir(parents=True, exist_ok=True)
    (qjl_home / "documents").write_text("a file where the folder should be")
    result = ask(fake_model, doc, Q)
    assert len(warnings(result)) == 1 and "could not be stored" in warnings(result)[0]
    (qjl_home / "documents").unlink()
    fake_model.fail["save_cache"] = CacheFileError("cannot write x.qjl: No space left on device; check the folder")
    result = ask(fake_model, doc, Q)
    assert len(warnings(result)) == 1 and "No space left" in warnings(result)[0]


# --- qjl cache list / prune / clear ----------------------------------------------------------------
def _entry(folder: Path, key: str, name: str, size: int, when: float, kv: str = "turbo") -> Path:
    """A header-only .qjl file as the store names its entries (what `cache list` reads)."""
    meta = {"format": "qjl-cache", "source_name": name, "document_tokens": "1234", "model_name": "tiny",
            "config": json.dumps({"kv": kv})}
    raw = json.dumps({"__metadata__": meta}).encode()
    raw += b" " * (size - 8 - len(raw))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.qjl"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    os.utime(path, (when, when))
    return path


def test_cache_list_prune_clear(qjl_home):
    folder = qjl_home / "documents"
    assert "no cached documents" in invoke("cache", "list").stdout
    paths = [_entry(folder, f"{i:032x}", f"doc{i}.pdf", 1000 * (i + 1), 1_700_000_000 + i, "qjl" if i else "turbo")
             for i in range(3)]
    (folder / "mine.qjl").write_bytes(b"not an entry")
    (folder / f"{'f' * 32}.qjl").write_bytes(b"unreadable")
    listed = json.loads(invoke("cache", "list", "--json").stdout)
    rows = {r["document"]: r for r in listed["entries"]}
    assert rows["doc2.pdf"]["tokens"] == 1234 and rows["doc0.pdf"]["mode"] == "turbo" and rows[None]["unreadable"]
    assert listed["entries"][0]["key"] == "f" * 32 and listed["entries"][-1]["document"] == "doc0.pdf"  # recent first
    text = invoke("cache", "list").stdout
    assert "doc1.pdf" in text and "1,234" in text and "5 documents" not in text and "4 documents" in text
    assert invoke("cache", "prune", "--max-size", "lots").exit_code == ExitCode.USAGE
    pruned = invoke("cache", "prune", "--max-size", "5K")  # 6,000 + 10 bytes: the oldest (doc0) goes
    assert pruned.exit_code == 0 and "removed 1 documents" in pruned.stdout and not paths[0].exists()
    cleared = invoke("cache", "clear")
    assert cleared.exit_code == 0 and "3 documents" in cleared.stdout
    assert [p.name for p in folder.iterdir()] == ["mine.qjl"]  # only the store's own names are deleted


def test_prune_removes_temporary_files_of_killed_saves(qjl_home):
    folder = qjl_home / "documents"
    folder.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", "import os, sys, time; open(os.path.join(sys.argv[1], "
                              "f'.{\"a\" * 32}.qjl.{os.getpid()}.k3x9q2_z.tmp'), 'wb').write(b'x'); print(1, "
                              "flush=True); time.sleep(60)", str(folder)], stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"1"
    assert invoke("cache", "prune").exit_code == 0 and len(list(folder.iterdir())) == 1  # its owner is alive
    child.kill()
    child.wait()
    assert invoke("cache", "prune").exit_code == 0 and list(folder.iterdir()) == []


# --- two real processes at once --------------------------------------------------------------------
@pytest.mark.slow
def test_two_first_asks_at_once_both_answer_and_one_entry_results(embedded_home, tmp_path):
    from qjl.cachefile import inspect_cache

    doc = tmp_path / "report.txt"
    doc.write_text((REPO / "qjl" / "data" / "sample.txt").read_text()[:700])
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(embedded_home / "models")
    env = {**os.environ, "QJL_HOME": str(home), "QJL_CACHE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "qjl_cli.main", "ask", str(doc), Q, "--max-new-tokens", "4", "--json"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert [line for line in err.splitlines() if "warning" in line and "--max-new-tokens" not in line] == []
    answers = {json.loads(out)["answer"] for out, _ in outs}
    assert len(answers) == 1
    [entry] = list((home / "documents").iterdir())  # one entry, no temporary file
    assert inspect_cache(entry)["source"]["name"] == "report.txt"
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "cache: hit" in third.stderr and json.loads(third.stdout)["answer"] in answers
