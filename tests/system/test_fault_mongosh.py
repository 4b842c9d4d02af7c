"""mongosh through the proxy with an error rule on find prints the injected code and codeName."""

import subprocess

from tests.integration.test_fault_drills import faulty_proxy
from tests.support.system import require_node_modules


def test_mongosh_prints_the_injected_error(secantus, db_name):
    mods = require_node_modules()
    rule = {"name": "drill-find", "op": "find", "ns": f"{db_name}.*", "action": "error", "code": 50}
    with faulty_proxy(secantus, rule) as pt:
        res = subprocess.run(
            [
                mods.mongosh,
                "--quiet",
                f"mongodb://127.0.0.1:{pt.port}/{db_name}?directConnection=true",
                "--eval",
                "db.things.insertOne({_id: 1});"
                "try { db.things.find({_id: 1}).toArray() } catch (e) { print('caught', e.code, e.codeName) }"
                "db.things.find({_id: 1}).toArray()",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            env=mods.env(),
        )
        pt.wait_until(
            lambda: len([e for e in pt.sink.commands if e.fault == "drill-find"]) == 2, what="the failed find"
        )
    out = res.stdout + res.stderr
    print(out)
    assert res.returncode != 0
    assert "caught 50 MaxTimeMSExpired" in out, out
    assert "MongoServerError: MaxTimeMSExpired (injected by mongoproxy fault rule drill-find)" in out
    events = [e for e in pt.sink.commands if e.fault == "drill-find"]
    assert [(e.code, e.code_name) for e in events] == [(50, "MaxTimeMSExpired")] * 2
    assert [e.op for e in pt.sink.commands if e.database == db_name and not e.fault] == ["insert"]
