"""The user errors of the library, in one torch-free module.

Each is a mistake or a condition the user can fix, with a one-line message that says what to do; the
CLI maps each class to its own exit code (qjl_cli/errors.py) without importing torch. Anything else
raised by the library is a bug.
"""

from __future__ import annotations


class QJLError(Exception):
    """Base of every user error the library raises."""


class ConfigError(QJLError, ValueError):
    """An invalid combination of settings."""


class DocumentError(QJLError, ValueError):
    """The document cannot be read or is not usable text."""


class ModelError(QJLError, RuntimeError):
    """The model cannot be found, converted or loaded."""


class CacheFileError(QJLError, ValueError):
    """A cache file is missing, unreadable, corrupt, of another version or for another model."""


class BenchError(QJLError, RuntimeError):
    """A benchmark cannot run as asked (missing text, a bad size)."""


class DocumentTooLongError(QJLError, ValueError):
    """The document does not fit the model's context; carries both token counts."""

    def __init__(self, document_tokens: int, limit: int, context: int):
        self.document_tokens, self.limit, self.context = document_tokens, limit, context
        super().__init__(
            f"the document is {document_tokens} tokens but at most {limit} fit (the model's context is {context} "
            f"tokens, less room for the question and answer); give --truncate head|tail|middle to keep that much "
            f"of it, shorten or split the document, lower --max-new-tokens, or use a model with a longer context")
