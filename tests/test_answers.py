"""End to end on the embedded model: QJL answers agree with the exact cache's on the bundled sample report.

The sample (qjl/data/sample.txt, ~1,045 prompt tokens) is fictional, so the model can only answer from the
document. A pair of answers agrees when both contain the fact the question asks for, or both miss it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qjl.cache import QJLCache
from qjl.config import QJLConfig

SAMPLE = Path(__file__).resolve().parents[1] / "qjl" / "data" / "sample.txt"

QUESTIONS = [
    ("Who is the general manager of the cooperative?", "Oyelaran"),
    ("How many households does the cooperative serve?", "18,400"),
    ("How many people did the cooperative employ at the end of 2023?", "64"),
    ("Which contractor built the Kestrel pump station?", "Dunmore"),
    ("In what year was the cooperative founded?", "1958"),
]


@pytest.fixture(scope="module")
def loaded(embedded_model_home):
    from qjl.models import load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QJL_HOME", str(embedded_model_home))
        return load_model(device="cpu")


def _answers(loaded, kv: str) -> tuple[list[str], object]:
    from qjl.session import Session

    session = Session(loaded, QJLConfig(kv=kv))
    session.load_document(SAMPLE.read_text())
    return [session.ask(q, max_new_tokens=24).text for q, _ in QUESTIONS], session


@pytest.fixture(scope="module")
def exact_answers(loaded):
    answers, _ = _answers(loaded, "exact")
    hits = [fact in a for a, (_, fact) in zip(answers, QUESTIONS)]
    assert sum(hits) >= 4, f"the exact cache itself misses facts: {answers}"
    return answers, hits


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["turbo", "qjl"])
def test_compressed_answers_agree_with_exact_on_four_of_five(loaded, exact_answers, kv):
    exact, hits_exact = exact_answers
    got, session = _answers(loaded, kv)
    hits = [fact in a for a, (_, fact) in zip(got, QUESTIONS)]
    agree = sum(e == q for e, q in zip(hits_exact, hits))
    assert agree >= 4, f"{kv} agrees on {agree}/5:\nexact={exact}\n{kv}={got}"
    # The session really answered from a compressed document segment, at a few bits per number.
    assert isinstance(session.cache, QJLCache) and session.config.kv == kv
    assert session.cache.layers[0].n_compressed > 0.8 * session.document_tokens
    assert session.stats().kv_bits_per_number < 6


@pytest.mark.slow
def test_questions_leave_the_document_state_untouched(loaded):
    from qjl.session import Session

    session = Session(loaded, QJLConfig())
    session.load_document(SAMPLE.read_text())
    before = {(i, n): t.clone() for i, layer in enumerate(session.cache.layers)
              for n, t in layer.document_tensors().items()}
    first = session.ask(QUESTIONS[0][0], max_new_tokens=12).text
    session.ask(QUESTIONS[1][0], max_new_tokens=12)
    after = {(i, n): t for i, layer in enumerate(session.cache.layers) for n, t in layer.document_tensors().items()}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert session.cache.get_seq_length() == session.document_tokens
    assert session.ask(QUESTIONS[0][0], max_new_tokens=12).text == first
