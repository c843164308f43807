"""--truncate with the real tokenizer and model: the prompt prefix fits exactly, the kept part is what was asked."""

from __future__ import annotations

import pytest

from qjl.config import QJLConfig

WORDS = " ".join(f"w{i}" for i in range(200))


@pytest.fixture(scope="module")
def small_model(embedded_model_home):
    """The embedded model, loaded once, told its context is 260 tokens so a 200-word document is too long."""
    import copy

    from qjl.models import load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QJL_HOME", str(embedded_model_home))
        loaded = copy.copy(load_model(None))
    loaded.__class__ = type("SmallContext", (type(loaded),), {"context_length": 260})
    return loaded


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["head", "tail", "middle"])
def test_truncate_keeps_what_it_says(small_model, mode):
    from qjl.session import DocumentTooLongError, Session

    session = Session(small_model, QJLConfig())
    max_new = 8
    limit = 260 - 64 - max_new
    full = len(session.tokenize_document(WORDS))
    assert full > limit
    with pytest.raises(DocumentTooLongError, match=f"the document is {full} tokens but at most {limit} fit"):
        session.check_fits(full, max_new)
    ids, cut = session.truncate_document(WORDS, full, max_new, mode)
    assert cut["mode"] == mode and cut["document_tokens"] == full and cut["limit"] == limit
    assert limit - 8 <= len(ids) == cut["kept_tokens"] <= limit
    assert cut["dropped_tokens"] > full - limit
    kept = session.tokenizer.decode(ids).split()
    assert "left" in kept and "out" in kept  # the marker shows where the cut is
    assert ("w0" in kept) == (mode in ("head", "middle"))
    assert ("w199" in kept) == (mode in ("tail", "middle"))
    assert "w100" not in kept
    assert "{question}" in session.suffix_template


@pytest.mark.slow
def test_truncate_tail_then_answers(small_model):
    from qjl.session import Session

    session = Session(small_model, QJLConfig())
    stats = session.load_document(WORDS, max_new_tokens=4, truncate="tail")
    assert stats.extra["truncated"]["mode"] == "tail"
    assert stats.document_tokens == stats.extra["truncated"]["kept_tokens"] <= 260 - 64 - 4
    answer = session.ask("Which word comes last?", max_new_tokens=4)
    assert answer.generated_tokens >= 1
