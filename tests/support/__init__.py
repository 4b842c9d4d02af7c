"""Test-side helpers for mongoproxy: system checks, ports, SecantusDB, a wire codec, scripted servers, the proxy process.

Everything here is independent of the production code so it can serve as an oracle.
"""
