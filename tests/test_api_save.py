"""Confidential save and restore over REST (migd/daemon/api.py: ``POST /v1/guests/{name}/save``,
``POST /v1/guests/restore``; docs/design.md §7) around a real Daemon on a real socket.

Every answer is checked against the OpenAPI document (tests/test_api.py ``Api.call``). Each refusal
is paired with its negative control: the same request, with only the fault removed, is accepted.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from migd.daemon import openapi
from migd.daemon.api import _file_path
from migd.errors import ConfigError
from migd.platform import identity

from test_api import GUEST_PAGES_16MIB, TOKEN, WORKLOAD, Api, run, serving

FINISHED = ("completed", "failed", "cancelled")


async def running_guest(api: Api, name: str = "g1", workload: dict[str, Any] | None = None) -> None:
    """A 16 MiB guest, started and READY (its migration-control MSR written), as tests/test_api.py does."""
    await api.ok("POST", "/v1/guests", {"name": name, "memory_mib": 16}, status=201)
    await api.ok("POST", f"/v1/guests/{name}/start", {"workload": workload or WORKLOAD})
    await api.poll(f"/v1/guests/{name}", lambda g: g["migration_control"]["ready"])


async def accepted(api: Api, path: str, body: dict[str, Any], role: str) -> dict[str, Any]:
    """POST a save or restore that must be accepted: 202, the role, Location naming the job."""
    answer = await api.call("POST", path, body)
    assert answer.status == 202, (path, body, answer)
    job = answer.body
    assert job["role"] == role and job["destination"] == body["path"], job
    assert answer.headers["Location"] == f"/v1/migrations/{job['id']}"
    return job  # type: ignore[no-any-return]


async def finished(api: Api, job: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Poll the job until it has ended (bounded); its final object."""
    final: dict[str, Any] = await api.poll(f"/v1/migrations/{job['id']}", lambda m: m["status"] in FINISHED,
                                           timeout=timeout)
    return final


async def save(api: Api, name: str, file: Path, **extra: Any) -> dict[str, Any]:
    """Save ``name`` to ``file`` and wait for the job to end."""
    return await finished(api, await accepted(api, f"/v1/guests/{name}/save", {"path": str(file), **extra}, "save"))


async def restore(api: Api, file: Path, **extra: Any) -> dict[str, Any]:
    return await finished(api, await accepted(api, "/v1/guests/restore", {"path": str(file), **extra}, "restore"))


def _sample(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"{series} not in the exposition"
    return float(match.group(1))


# ---------------------------------------------------------------------- the round trip


def test_save_then_restore_over_rest(tmp_path: Path) -> None:
    async def main() -> None:
        saves = tmp_path / "saves"
        saves.mkdir()
        async with serving(tmp_path) as api:
            await running_guest(api)
            file = saves / "g1.save"
            done = await save(api, "g1", file)
            assert done["status"] == "completed" and done["error"] is None, done
            assert done["bytes"]["remaining"] == 0 and done["pages"]["private"] > 0
            assert (await api.ok("GET", "/v1/migrations"))["migrations"] == [done]
            saved = await api.ok("GET", "/v1/guests/g1")
            assert saved["state"] == "saved" and saved["migrated"] is None
            assert saved["migration_control"]["ready"] is False and saved["agent"]["pid"] is None
            info = file.stat()
            assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
            assert sorted(os.listdir(saves)) == ["g1.save"]  # no temporary .part left behind

            back = await restore(api, file)
            assert back["status"] == "completed" and back["error"] is None, back
            assert back["guest"] == "g1" and back["pages"] == done["pages"]
            restored = await api.poll("/v1/guests/g1", lambda g: g["check"]["pages_verified"] > 0)
            assert restored["state"] == "running"
            assert restored["check"] == {"pages_verified": GUEST_PAGES_16MIB, "errors": 0, "last_error": None}

            # At most once: the same file again is refused, under any name ...
            again = await api.call("POST", "/v1/guests/restore", {"path": str(file), "name": "g1-again"})
            assert again.status == 409 and again.body["error"] == "conflict", again
            assert "restored on this host before" in again.detail
            # ... and while g1 runs, its name is taken whatever the file.
            taken = await api.call("POST", "/v1/guests/restore", {"path": str(file)})
            assert taken.status == 409 and "already exists" in taken.detail, taken
            assert sorted(g["name"] for g in (await api.ok("GET", "/v1/guests"))["guests"]) == ["g1"]

            # Negative control of the once-only refusal: a new save of the restored guest (a live one
            # this time, the guest writing memory) restores, on the same host.
            second = saves / "g1-live.save"
            live = await save(api, "g1", second, live=True)
            assert live["status"] == "completed" and live["rounds"] >= 2, live
            assert (await api.ok("GET", "/v1/guests/g1"))["state"] == "saved"
            back_live = await restore(api, second, name="g1")
            assert back_live["status"] == "completed", back_live
            await api.poll("/v1/guests/g1", lambda g: g["check"]["pages_verified"] > 0)
            assert (await api.ok("GET", "/v1/guests/g1"))["check"]["errors"] == 0

            # The jobs are counted under their own roles (migd/daemon/metrics.py ROLES).
            metrics = (await api.call("GET", "/metrics")).body
            assert _sample(metrics, 'migd_migrations_total{role="save",result="completed"}') == 2
            assert _sample(metrics, 'migd_migrations_total{role="restore",result="completed"}') == 2
            assert _sample(metrics, 'migd_migrations_total{role="source",result="completed"}') == 0
            assert _sample(metrics, 'migd_migration_rounds_total{role="save"}') == done["rounds"] + live["rounds"]
            # A live save counts the pages it wrote again in later rounds; a restore places each once.
            assert _sample(metrics, 'migd_migration_pages_total{role="save",kind="private"}') == (
                done["pages"]["private"] + live["pages"]["private"])
            assert _sample(metrics, 'migd_migration_pages_total{role="restore",kind="private"}') == (
                back["pages"]["private"] + back_live["pages"]["private"])
            assert _sample(metrics, 'migd_migration_records{role="save",status="completed"}') == 2
            await api.ok("POST", "/v1/guests/g1/stop")

    run(main, timeout=120)


def test_a_file_saved_for_another_host_restores_only_there(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, "hostA") as a, serving(tmp_path, "hostB") as b:
            await running_guest(a)
            pdh_b = tmp_path / "hostB" / identity.PDH_CERT
            file = tmp_path / "g1-for-b.save"
            done = await save(a, "g1", file, for_host_pdh=str(pdh_b))
            assert done["status"] == "completed", done
            refused = await a.call("POST", "/v1/guests/restore", {"path": str(file)})
            assert refused.status == 409 and "saved for another host" in refused.detail, refused
            # Negative control: on hostB it restores, and the guest checks every page.
            moved = await restore(b, file)
            assert moved["status"] == "completed", moved
            arrived = await b.poll("/v1/guests/g1", lambda g: g["check"]["pages_verified"] > 0)
            assert arrived["check"] == {"pages_verified": GUEST_PAGES_16MIB, "errors": 0, "last_error": None}
            await b.ok("POST", "/v1/guests/g1/stop")

    run(main, timeout=120)


# ---------------------------------------------------------------------- refusals (409, 404)


def test_a_save_that_cannot_start_is_409_and_writes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        target = tmp_path / "saves"
        target.mkdir()
        existing = target / "taken.save"
        existing.write_bytes(b"keep me")
        # A PDH certificate under an owner CA this host does not trust.
        identity.init_host(tmp_path / "stranger", tmp_path / "other-ca", common_name="stranger")
        async with serving(tmp_path) as api:
            await running_guest(api)
            await api.ok("POST", "/v1/guests", {"name": "g0", "memory_mib": 16}, status=201)
            cases = [
                ("g1", {"path": str(existing)}, 409, "exists; a save never replaces a file"),
                ("g1", {"path": str(tmp_path / "no-such-dir" / "g1.save")}, 409, "does not exist"),
                ("g1", {"path": str(target / "g1.save"), "for_host_pdh": str(tmp_path / "stranger" / "pdh.pem")},
                 409, "is not one the save may be for"),
                ("g1", {"path": str(target / "g1.save"), "for_host_pdh": str(tmp_path / "absent.pem")},
                 409, "cannot read the PDH certificate"),
                ("g0", {"path": str(target / "g0.save")}, 409, "only a running guest can be saved"),
                ("ghost", {"path": str(target / "ghost.save")}, 404, "ghost"),
            ]
            for name, body, status, why in cases:
                answer = await api.call("POST", f"/v1/guests/{name}/save", body)
                assert answer.status == status and why in answer.detail, (name, body, answer)
            assert existing.read_bytes() == b"keep me"
            assert sorted(os.listdir(target)) == ["taken.save"]
            assert (await api.ok("GET", "/v1/migrations"))["migrations"] == []
            assert (await api.ok("GET", "/v1/guests/g1"))["state"] == "running"
            # Negative control: the same request to a free name in that directory, for this host's own
            # PDH certificate (a trusted one), is accepted and completes.
            own = str(tmp_path / "hostA" / identity.PDH_CERT)
            done = await save(api, "g1", target / "g1.save", for_host_pdh=own)
            assert done["status"] == "completed", done
            assert sorted(os.listdir(target)) == ["g1.save", "taken.save"]

    run(main, timeout=90)


def test_a_file_that_is_no_save_of_this_host_is_409_and_creates_no_guest(tmp_path: Path) -> None:
    async def main() -> None:
        files = tmp_path / "files"
        files.mkdir()
        garbage = files / "garbage.save"
        garbage.write_bytes(os.urandom(200 * 1024))
        empty = files / "empty.save"
        empty.touch()
        async with serving(tmp_path) as api:
            await running_guest(api)
            real = files / "g1.save"
            assert (await save(api, "g1", real))["status"] == "completed"
            cases = [
                (files / "absent.save", "cannot open"),
                (files, "is not a regular file"),
                (garbage, ""),  # whatever the parser meets first: a 409 with a reason, never a 5xx
                (empty, "truncated or not a migd save file"),
            ]
            for path, why in cases:
                answer = await api.call("POST", "/v1/guests/restore", {"path": str(path)})
                assert answer.status == 409 and answer.body["error"] == "conflict", (path, answer)
                assert why in answer.detail and answer.detail, (path, answer)

            # A flipped bit in the trailer MAC passes the synchronous checks; the job then fails on the
            # MAC, before any guest exists, and leaves the file restorable.
            tampered = files / "tampered.save"
            data = bytearray(real.read_bytes())
            data[-1] ^= 1
            tampered.write_bytes(data)
            failed = await restore(api, tampered)
            assert failed["status"] == "failed" and "does not verify" in failed["error"], failed
            guests = (await api.ok("GET", "/v1/guests"))["guests"]
            assert [(g["name"], g["state"]) for g in guests] == [("g1", "saved")]  # no half-created guest
            assert (await api.ok("GET", "/v1/guests/g1"))["state"] == "saved"

            # Negative control: the untouched file restores.
            done = await restore(api, real)
            assert done["status"] == "completed", done
            await api.poll("/v1/guests/g1", lambda g: g["check"]["pages_verified"] > 0)
            await api.ok("POST", "/v1/guests/g1/stop")

    run(main, timeout=90)


# ---------------------------------------------------------------------- bad bodies (400)


def test_invalid_save_and_restore_bodies_are_400_naming_the_field(tmp_path: Path) -> None:
    save_cases: list[tuple[Any, str]] = [
        (b"", "empty body"),
        (b"not json", "not valid JSON"),
        ({}, "missing required key 'path'"),
        ({"live": True}, "missing required key 'path'"),
        ({"path": "PATH", "colour": "red"}, "unknown key 'colour'"),
        ({"path": "PATH", "to": "/x"}, "unknown key 'to'"),
        ({"path": "PATH", "live": "yes"}, "live: expected boolean, got string"),
        ({"path": "PATH", "live": 1}, "live: expected boolean, got integer"),
        ({"path": "PATH", "live": None}, "live: expected boolean, got null"),
        ({"path": "relative.save"}, "path: must match"),
        ({"path": "./g1.save"}, "path: must match"),
        ({"path": ""}, "path: must be at least 1"),
        ({"path": 7}, "path: expected string"),
        ({"path": None}, "path: expected string, got null"),
        ({"path": "/" + "a" * openapi.MAX_FILE_PATH}, "path: must be at most 4096"),
        ({"path": "/tmp/a\u0000b"}, "path: must match"),
        (b'{"path": "/tmp/\\ud800.save"}', "path: not a file name this host can encode"),
        ({"path": "PATH", "for_host_pdh": "pdh.pem"}, "for_host_pdh: must match"),
        ({"path": "PATH", "for_host_pdh": 5}, "for_host_pdh: expected string or null"),
    ]
    restore_cases: list[tuple[Any, str]] = [
        (b"", "empty body"),
        ({}, "missing required key 'path'"),
        ({"name": "g2"}, "missing required key 'path'"),
        ({"path": "PATH", "live": True}, "unknown key 'live'"),
        ({"path": "g1.save"}, "path: must match"),
        ({"path": "PATH", "name": "../etc"}, "name: must match"),
        ({"path": "PATH", "name": ""}, "name: must match"),
        ({"path": "PATH", "name": 5}, "name: expected string or null"),
        (b'{"path": "/\\udfff"}', "path: not a file name this host can encode"),
    ]

    async def main() -> None:
        files = tmp_path / "files"
        files.mkdir()
        valid = str(files / "new.save")

        def fill(body: Any) -> Any:
            return {k: valid if v == "PATH" else v for k, v in body.items()} if isinstance(body, dict) else body

        async with serving(tmp_path) as api:
            await running_guest(api)
            cases = [("/v1/guests/g1/save", fill(b), why) for b, why in save_cases]
            cases += [("/v1/guests/restore", fill(b), why) for b, why in restore_cases]
            for path, body, why in cases:
                raw = body if isinstance(body, bytes) else None
                answer = await api.call("POST", path, body, raw=raw)
                assert answer.status == 400 and answer.body["error"] == "bad_request", (path, body, answer)
                assert why in answer.detail, (path, body, answer.detail)
            # Nothing happened: no job, no file, the guest runs on.
            assert (await api.ok("GET", "/v1/migrations"))["migrations"] == []
            assert os.listdir(files) == []
            assert (await api.ok("GET", "/v1/guests/g1"))["state"] == "running"

            # Negative controls: a relative path refused above is accepted made absolute; null is the
            # documented default of the optional fields; a path the OS can encode (an escaped byte,
            # U+DC80..U+DCFF) gets past the encoding check to the engine.
            escaped = await api.call("POST", "/v1/guests/restore", {"path": str(files / "\udcff.save")})
            assert escaped.status == 409 and "cannot open" in escaped.detail, escaped
            done = await save(api, "g1", files / "relative.save", for_host_pdh=None, live=False)
            assert done["status"] == "completed", done
            back = await restore(api, files / "relative.save", name=None)
            assert back["status"] == "completed", back
            await api.poll("/v1/guests/g1", lambda g: g["check"]["pages_verified"] > 0)
            await api.ok("POST", "/v1/guests/g1/stop")

    run(main, timeout=90)


def test_file_path_refuses_what_no_file_name_can_hold() -> None:
    assert _file_path({"path": "/a/b"}, "path") == "/a/b"
    assert _file_path({}, "for_host_pdh") is None and _file_path({"for_host_pdh": None}, "for_host_pdh") is None
    assert _file_path({"path": "/\udc80"}, "path") == "/\udc80"  # surrogateescape: the byte 0x80
    with pytest.raises(ConfigError, match="path: not a file name this host can encode"):
        _file_path({"path": "/\ud800"}, "path")
    # Negative control: without the check the OS call raises (a 500 in a handler), it does not refuse.
    with pytest.raises(UnicodeEncodeError):
        os.stat("/\ud800")


# ---------------------------------------------------------------------- routing and the document


def test_the_restore_route_is_not_shadowed_by_a_guest_called_restore(tmp_path: Path) -> None:
    """Only POST /v1/guests/restore is the restore; a guest may still be called ``restore``.

    Its GET and DELETE go around ``Api.call``: by OpenAPI's rule (a concrete path before a
    templated one) the document gives GET /v1/guests/restore to the restore path, which has no GET,
    and tests/test_api.py ``documented_response`` stops there.
    """
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def main() -> None:
        async with serving(tmp_path) as api:
            await api.ok("POST", "/v1/guests", {"name": "restore", "memory_mib": 16}, status=201)
            async with api.client.get("/v1/guests/restore", headers=headers) as resp:  # GET: the guest
                assert resp.status == 200 and (await resp.json())["name"] == "restore"
            answer = await api.call("POST", "/v1/guests/restore", {})  # POST: the restore route
            assert answer.status == 400 and "missing required key 'path'" in answer.detail, answer
            # The guest's own save route names it.
            answer = await api.call("POST", "/v1/guests/restore/save", {"path": str(tmp_path / "r.save")})
            assert answer.status == 409 and "guest restore is defined" in answer.detail, answer
            # Negative control: a method no route of that path has is a 405 listing both resources' methods.
            answer = await api.call("PUT", "/v1/guests/restore")
            assert answer.status == 405 and set(answer.headers["Allow"].split(",")) == {"GET", "DELETE", "POST"}
            async with api.client.delete("/v1/guests/restore", headers=headers) as resp:
                assert resp.status == 204
            assert (await api.ok("GET", "/v1/guests")) == {"guests": []}

    run(main)


def test_the_document_describes_save_and_restore() -> None:
    doc = openapi.DOCUMENT
    save_op = doc["paths"]["/v1/guests/{name}/save"]["post"]
    restore_op = doc["paths"]["/v1/guests/restore"]["post"]
    for op, request in ((save_op, "SaveRequest"), (restore_op, "RestoreRequest")):
        assert op["requestBody"] == {"required": True,
                                     "content": {"application/json": {"schema": openapi.ref(request)}}}
        assert op["responses"]["202"]["content"]["application/json"]["schema"] == openapi.ref("Migration")
        assert {"400", "401", "409", "413", "default"} <= set(op["responses"])
        assert openapi.schema(request)["additionalProperties"] is False
    assert "404" in save_op["responses"] and "404" not in restore_op["responses"]  # only save names a guest
    # The literal path comes before the template, for clients that match in document order.
    paths = list(doc["paths"])
    assert paths.index("/v1/guests/restore") < paths.index("/v1/guests/{name}")
    migration = openapi.schema("Migration")["properties"]
    assert migration["role"]["enum"] == ["source", "destination", "save", "restore"]
    assert "saved" in openapi.schema("Guest")["properties"]["state"]["enum"]

    # An independent JSON Schema 2020-12 validator reads the path rule as check() does.
    import jsonschema_rs

    served = json.loads(json.dumps(doc))
    validator = jsonschema_rs.Draft202012Validator(
        {**served["components"]["schemas"]["SaveRequest"], "components": served["components"]})
    good = [{"path": "/"}, {"path": "/var/lib/migd/g1.save", "live": True}, {"path": "/x", "for_host_pdh": None},
            {"path": "/x", "for_host_pdh": "/etc/migd/pdh.pem"}]
    bad = [{"path": "x"}, {"path": ""}, {"path": "/a\u0000"}, {"path": "/" * 4097}, {"path": "/x", "live": None},
           {"path": "/x", "for_host_pdh": "pdh.pem"}, {"path": "/x", "extra": 1}, {}]
    for body in good:
        openapi.check(body, openapi.schema("SaveRequest"))
    for body in bad:
        with pytest.raises(ConfigError):
            openapi.check(body, openapi.schema("SaveRequest"))
    assert [validator.is_valid(b) for b in good + bad] == [True] * len(good) + [False] * len(bad)
    # Negative control: without the pattern a relative path and a NUL would be schema-valid.
    loose = {k: v for k, v in openapi.schema("SaveRequest")["properties"]["path"].items() if k != "pattern"}
    openapi.check("x", loose)
    openapi.check("/a\u0000", loose)


def test_no_body_check_without_the_token(tmp_path: Path) -> None:
    """The token gate comes first on the new routes too: a bad body without it is a 401, not a 400."""
    async def main() -> None:
        async with serving(tmp_path) as api:
            for path in ("/v1/guests/g1/save", "/v1/guests/restore"):
                answer = await api.call("POST", path, {"colour": "red"}, token=None)
                assert answer.status == 401, (path, answer)
                # Negative control: with the token the same body reaches the schema check.
                answer = await api.call("POST", path, {"colour": "red"}, token=TOKEN)
                assert answer.status == 400 and "missing required key 'path'" in answer.detail, (path, answer)

    run(main)

