"""The harnesses by name: module and what it fuzzes. Strings only, so importing this instruments nothing."""

HARNESSES = {
    "scanner": ("tests.fuzz.harness_scanner", "frame scanner + body scanner, arbitrary streams and splits"),
    "tracker": ("tests.fuzz.harness_tracker", "request/reply matching, pending and exhaust tables"),
    "replay": ("tests.fuzz.harness_replay", "replay's pcap/pcapng reader, TCP reassembly, extraction"),
    # The hello rewriter does not exist yet: tests/fuzz/targets.py has the slot (rewrite_hello = None).
    "hello": ("tests.fuzz.harness_hello", "the hello rewriter (not written yet)"),
}
# Modules each harness instruments for coverage feedback: only the code under test, since every instrumented
# branch costs a callback (the Cython scanner is not instrumented at all). Re-point with tests/fuzz/targets.py.
INSTRUMENT = {
    "scanner": ("mongoproxy.protocol.framing", "mongoproxy.protocol.compression"),
    "tracker": ("mongoproxy.tracker",),
    "replay": ("mongoproxy.replay.reader", "mongoproxy.replay.extract"),
    "hello": (),
}
