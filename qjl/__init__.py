"""qjl: a KV cache compressed with QJL (1-bit JL keys) for transformers models, and the pieces to ask
documents questions with it. The library never prints or exits; `qjl_cli` is the command line."""
