"""RAM admission control through the REST API of two real daemons (in one event loop, real agents).

The destination's RAM directory is a real directory; its filesystem is made small through the
capacity module's ``space`` seam: a filesystem of 64 MiB whose used space is what the real files
under the RAM directory occupy (``st_blocks``). Guests really populate their RAM files, so this
runs the same everywhere, root or not, without mounting anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from migd.abi import MiB
from migd.daemon import openapi
from migd.daemon.api import build_app
from migd.daemon.core import Daemon
from migd.guest.ram_capacity import FsSpace, allocated_bytes

from test_api import TOKEN, make_daemon  # tests/ is on sys.path under pytest

#: What the refusal says, with its numbers (migd/guest/ram_capacity.py InsufficientRam).
REFUSAL = re.compile(
    r"no room for guest (?P<guest>\S+)'s RAM: needs (?P<needed>[\d.]+) MiB, (?P<free>[\d.]+) MiB free, "
    r"(?P<committed>[\d.]+) MiB committed to other guests, (?P<available>[\d.]+) MiB available \(in (?P<dir>\S+)\)"
)


class SizedFs:
    """``capacity`` bytes, used by exactly the files under ``directory``."""

    def __init__(self, directory: Path, capacity: int) -> None:
        self.directory, self.capacity = directory, capacity

    def space(self, directory: Path) -> FsSpace:
        used = sum(allocated_bytes(p) for p in self.directory.rglob("*") if p.is_file())
        return FsSpace(total=self.capacity, free=max(0, self.capacity - used))


@dataclass
class Api:
    client: TestClient
    daemon: Daemon

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with self.client.request(method, path, json=body, headers=headers) as resp:
            return resp.status, (await resp.json() if resp.content_type == "application/json" else None)

    async def guest(self, name: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/v1/guests/{name}")
        assert status == 200, body
        openapi.check(body, openapi.ref("Guest"))
        return body  # type: ignore[no-any-return]

    async def poll(self, path: str, predicate: Any, timeout: float = 30.0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                status, body = await self.call("GET", path)
                if status == 200 and predicate(body):
                    return body
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def serving(root: Path, name: str, ram_dir: Path) -> AsyncIterator[Api]:
    daemon = make_daemon(root, name, guests={"ram_dir": str(ram_dir)})
    await daemon.start()
    client = TestClient(TestServer(build_app(daemon, TOKEN), host="127.0.0.1", port=0))
    try:
        await client.start_server()
        yield Api(client, daemon)
    finally:
        await client.close()
        await daemon.shutdown()


def numbers(detail: str) -> dict[str, Any]:
    match = REFUSAL.fullmatch(detail)
    assert match is not None, detail
    values: dict[str, Any] = {k: float(v) for k, v in match.groupdict().items() if k not in ("guest", "dir")}
    # Each figure is printed rounded to 0.1 MiB (±0.05), so three of them differ by up to 0.15.
    assert abs(values["available"] - max(0.0, values["free"] - values["committed"])) <= 0.15 + 1e-9, detail
    return {**values, "guest": match["guest"], "dir": match["dir"]}


def test_a_full_ram_filesystem_refuses_create_start_and_incoming_with_the_numbers(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    base = Path(shm if shm.is_dir() else tmp_path)
    ram_root = Path(tempfile.mkdtemp(prefix="migd-capacity-", dir=base))

    async def main() -> None:
        async with serving(tmp_path, "hostA", ram_root / "a") as a, serving(tmp_path, "hostB", ram_root / "b") as b:
            ram_b = b.daemon.host.guests_dir
            assert ram_b == ram_root / "b"
            b.daemon.host.ram_account.space = SizedFs(ram_b, 64 * MiB).space  # hostB's RAM filesystem: 64 MiB
            workload = {"dirty_rate_mib_s": 4, "convert_rate_hz": 5, "seed": 3, "populate_fraction": 0.5}

            # A resident guest on hostB that populates half its 32 MiB.
            assert (await b.call("POST", "/v1/guests", {"name": "resident", "memory_mib": 32}))[0] == 201
            assert (await b.call("POST", "/v1/guests/resident/start", {"workload": workload}))[0] == 200
            resident = await b.poll("/v1/guests/resident", lambda g: g["migration_control"]["ready"])
            resident_pid = resident["agent"]["pid"]
            assert resident_pid is not None and resident["agent"]["exit"] is None
            assert allocated_bytes(ram_b / "resident" / "ram") > 0  # it really populated RAM

            # create: a 48 MiB guest does not fit in what is left (64 - 32 for the resident = 32 MiB).
            status, body = await b.call("POST", "/v1/guests", {"name": "big", "memory_mib": 48})
            assert status == 409, body
            refused = numbers(body["detail"])
            assert (refused["guest"], refused["dir"], refused["needed"], refused["available"]) == \
                ("big", str(ram_b), 48.0, 32.0)
            assert refused["committed"] > 0 and not (ram_b / "big").exists()

            assert (await b.call("POST", "/v1/guests", {"name": "small", "memory_mib": 24}))[0] == 201
            assert (await b.call("POST", "/v1/guests", {"name": "spare", "memory_mib": 16}))[0] == 201
            assert (await b.call("POST", "/v1/guests/small/start", {}))[0] == 200
            # start: spare was defined while it fitted; small's start took the room since.
            status, body = await b.call("POST", "/v1/guests/spare/start", {})
            assert status == 409, body
            assert numbers(body["detail"])["available"] == 8.0 and numbers(body["detail"])["needed"] == 16.0
            assert (await b.guest("spare"))["state"] == "defined"
            assert (await b.guest("spare"))["agent"] == {"pid": None, "exit": None}  # no agent was started

            # incoming: hostA's 32 MiB guest is refused before any file exists on hostB.
            assert (await a.call("POST", "/v1/guests", {"name": "mover", "memory_mib": 32}))[0] == 201
            assert (await a.call("POST", "/v1/guests/mover/start", {"workload": workload}))[0] == 200
            await a.poll("/v1/guests/mover", lambda g: g["migration_control"]["ready"])
            destination = f"127.0.0.1:{b.daemon.migration_port}"
            status, migration = await a.call("POST", "/v1/guests/mover/migrate", {"destination": destination})
            assert status == 202, migration
            done = await a.poll(f"/v1/migrations/{migration['id']}", lambda m: m["status"] in ("completed", "failed"))
            assert done["status"] == "failed", done
            found = REFUSAL.search(done["error"])
            assert found is not None, done["error"]
            assert numbers(found.group(0))["needed"] == 32.0 and numbers(found.group(0))["guest"] == "mover"
            assert (await a.guest("mover"))["state"] == "running"  # the source keeps its guest
            assert (await b.call("GET", "/v1/guests/mover"))[0] == 404
            assert not (ram_b / "mover").exists()
            (incoming,) = [m for m in (await b.call("GET", "/v1/migrations"))[1]["migrations"]
                           if m["id"] == migration["id"]]
            assert incoming["status"] == "failed" and REFUSAL.search(incoming["error"]), incoming

            # No other guest was harmed: the resident runs on, same agent, every page checks out.
            resident_guest = b.daemon.guest("resident")
            report = await resident_guest.check()
            assert report.errors == 0 and report.pages_verified == resident_guest.definition.npages
            assert (await b.guest("resident"))["agent"]["pid"] == resident_pid

            # Negative control: with room made, the same migration goes through (to the last byte).
            # Stopping small is not enough (its RAM file keeps the pages it wrote); deleting it is.
            assert (await b.call("POST", "/v1/guests/small/stop", {}))[0] == 200
            assert (await b.guest("small"))["agent"] == {"pid": None, "exit": None}  # a stop we asked for
            status, migration = await a.call("POST", "/v1/guests/mover/migrate", {"destination": destination})
            assert status == 202, migration
            done = await a.poll(f"/v1/migrations/{migration['id']}", lambda m: m["status"] in ("completed", "failed"))
            found = REFUSAL.search(done["error"])
            assert done["status"] == "failed" and found is not None and numbers(found.group(0))["needed"] == 32.0, done
            assert (await b.call("DELETE", "/v1/guests/small"))[0] == 204
            status, migration = await a.call("POST", "/v1/guests/mover/migrate", {"destination": destination})
            assert status == 202, migration
            done = await a.poll(f"/v1/migrations/{migration['id']}", lambda m: m["status"] in ("completed", "failed"))
            assert done["status"] == "completed", done
            arrived = await b.poll("/v1/guests/mover", lambda g: g["check"]["pages_verified"] > 0)
            assert arrived["check"]["errors"] == 0 and arrived["state"] == "running"
            # ... and now hostB is full again: even 1 MiB is refused, with the numbers.
            status, body = await b.call("POST", "/v1/guests", {"name": "tiny", "memory_mib": 1})
            assert status == 409 and numbers(body["detail"])["available"] < 1.0, body

    try:
        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        shutil.rmtree(ram_root, ignore_errors=True)
