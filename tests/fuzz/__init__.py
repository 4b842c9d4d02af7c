"""Coverage-guided fuzzing (atheris) of the parsers that see untrusted bytes; see docs/hardening.md."""
