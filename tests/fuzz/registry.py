"""The harnesses by name: module and what it fuzzes. Strings only, so importing this instruments nothing."""

HARNESSES = {
    "scanner": ("tests.fuzz.harness_scanner", "frame scanner + body scanner, arbitrary streams and splits"),
    "tracker": ("tests.fuzz.harness_tracker", "request/reply matching, pending and exhaust tables"),
    "replay": ("tests.fuzz.harness_replay", "replay's pcap/pcapng reader, TCP reassembly, extraction"),
    "hello": ("tests.fuzz.harness_hello", "the hello rewriter: arbitrary bytes and valid hello replies"),
}
# Modules each harness instruments for coverage feedback: only the code under test, since every instrumented
# branch costs a callback (the Cython scanner is not instrumented at all). Re-point with tests/fuzz/targets.py.
# atheris.instrument_imports includes by top-level package: naming one module instruments every module of
# `mongoproxy` the harness imports; NOT_INSTRUMENTED (exact module names) is how a module is left out.
INSTRUMENT = {
    "scanner": ("mongoproxy.protocol.framing", "mongoproxy.protocol.compression"),
    "tracker": ("mongoproxy.tracker",),
    "replay": ("mongoproxy.replay.reader", "mongoproxy.replay.extract"),
    "hello": ("mongoproxy.protocol.hello",),
}
# Helpers of the harness itself, not under test: replay's pcapng writer builds each input's capture file
# (load() never runs it); instrumented, it took replay from about 700 to about 150 executions per second.
NOT_INSTRUMENTED = {
    "replay": ("mongoproxy.pcapng",),
}
