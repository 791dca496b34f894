"""A migd host in its own process, driven over stdin/stdout JSON lines (engine tests).

The engine tests need two real processes before the REST daemon exists: this runs a
``Host`` and a ``MigrationListener`` on uvloop and answers one JSON command per line:

    {"op": "listen"}                      -> {"port": N}
    {"op": "guests"}                      -> {"guests": [guest JSON...]}
    {"op": "dirs"}                        -> {"dirs": [guest directory names on disk]}
    {"op": "wait_check", "name": N}       -> the arrival self-check report
    {"op": "check", "name": N}            -> a self-check now
    {"op": "hypercalls", "name": N}       -> hypercall counts by result
    {"op": "migrations"}                  -> {"migrations": [...], "bitmaps": {id: sha256}}
    {"op": "exit"}                        -> stops every guest and exits

Usage: python host_process.py ROOT NAME   (identity under ROOT/NAME, CA under ROOT/ca)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from migd.platform import identity  # noqa: E402
from migd.listener import MigrationListener  # noqa: E402
from migd.host import Host  # noqa: E402
from migd.platform.psp import PspFirmware  # noqa: E402


async def serve(root: Path, name: str) -> None:
    state = root / name
    identity.init_host(state, root / "ca", common_name=name)
    firmware = PspFirmware.from_state_dir(state, [root / "ca" / identity.CA_CERT])
    runtime = root / f"run-{name}"  # reused across restarts of this host, removed with tmp_path
    if len(os.fsencode(runtime)) > 80:  # unix socket paths are short
        runtime = Path(tempfile.mkdtemp(prefix=f"migd-{name}-"))
    host = Host(state, firmware, runtime_dir=runtime)
    listener = MigrationListener(host)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "removed_partial": host.removed_partial})
    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "listen":
                reply({"port": await listener.start("127.0.0.1", 0)})
            elif op == "guests":
                reply({"guests": [g.to_json() for g in host.guests.values()]})
            elif op == "dirs":
                reply({"dirs": sorted(p.name for p in host.guests_dir.iterdir())})
            elif op == "wait_check":
                report = await host.get(cmd["name"]).wait_check(60)
                reply(vars(report))
            elif op == "hypercalls":
                reply(dict(host.get(cmd["name"]).vm.hypercall_counts))
            elif op == "check":
                reply(vars(await host.get(cmd["name"]).check()))
            elif op == "migrations":
                reply({
                    "migrations": [m.to_json() for m in host.migrations.values()],
                    "bitmaps": {m.id: m.shared_bitmap_sha256 for m in host.migrations.values()},
                })
            elif op == "exit":
                break
            else:
                reply({"error": f"unknown op {op}"})
        except Exception as exc:  # report every failure to the test, keep serving
            reply({"error": f"{type(exc).__name__}: {exc}"})
    await listener.close()
    await host.close()
    reply({"bye": True})


if __name__ == "__main__":
    uvloop.run(serve(Path(sys.argv[1]), sys.argv[2]))
