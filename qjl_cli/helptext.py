"""The epilogs of `--help`: examples, the interactive session, the environment, the exit codes."""

from __future__ import annotations

from .errors import EXIT_CODES_HELP

ENVIRONMENT_HELP = """\
Environment:
  QJL_MODEL       default model (else the embedded SmolLM2-135M-Instruct)
  QJL_HOME        where converted models and cached documents live
  QJL_CACHE       0: no automatic document cache (as --no-cache everywhere)
  QJL_CACHE_MAX   the automatic cache's cap, e.g. 500M (default 2G)
  QJL_SERVER      0: run alone even when `qjl serve` is running
  QJL_NATIVE      0: no compiled CPU kernels (the torch code runs)
  QJL_KERNELS     0: no CUDA kernels (the torch code runs on the GPU)
  HF_HUB_OFFLINE  1: never use the network for models
  NO_COLOR        no colour on stderr
  QJL_DEBUG       1: print tracebacks"""

ASK_EXAMPLES = """\
Examples:
  qjl ask report.pdf "What was revenue in 2023?"
  qjl ask report.pdf                                  (interactive: many questions, one reading)
  cat notes.md | qjl ask - "Summarise the decisions" --json
  qjl ask minutes.txt budget.pdf page.html -q "Who approved the budget?"
  qjl ask report.pdf --questions questions.txt > answers.jsonl
  qjl ask report.pdf "When?" --no-cache               (read again; neither use nor store the cache)
  qjl ask long.txt "How does it end?" --truncate tail
  qjl ask secret.pdf "Who signed it?" --password hunter2
  qjl ask report.md "Who signed it?" -m ./SmolLM2-360M.gguf
  qjl serve &                                         (later asks skip the start-up: see qjl serve --help)"""

INTERACTIVE_HELP = """\
Interactive session (no question, stdin a terminal): a conversation, each
  answer sees the earlier questions and answers (the oldest are dropped, with a
  notice, when they outgrow the context); Ctrl-C stops an answer, Ctrl-D or
  /exit leaves; /info shows tokens, cache bytes and bits per number; /history
  the turns kept; /reset forgets them; /save FILE.qjl writes the document's
  cache. Questions given with -q, --questions or on stdin are each answered
  from the document alone, unless --chat."""

CACHE_EXAMPLES = """\
Examples:
  qjl cache save report.txt -o report.qjl
  qjl ask report.qjl "Who signed it?"
  qjl cache load report.qjl -q "Who signed it?" -q "When?"
  qjl cache info report.qjl --json
  qjl cache list                     (the automatic cache: documents asked before)
  qjl cache prune --max-size 500M; qjl cache clear"""


def epilog(*parts: str) -> str:
    return "\n\n".join(parts)


MAIN = epilog(EXIT_CODES_HELP, ENVIRONMENT_HELP)
ASK = epilog(ASK_EXAMPLES, INTERACTIVE_HELP, EXIT_CODES_HELP, ENVIRONMENT_HELP)
CACHE = epilog(CACHE_EXAMPLES, EXIT_CODES_HELP)
CACHE_SAVE = epilog(CACHE_EXAMPLES, EXIT_CODES_HELP, ENVIRONMENT_HELP)
CACHE_LOAD = epilog(INTERACTIVE_HELP, EXIT_CODES_HELP)
