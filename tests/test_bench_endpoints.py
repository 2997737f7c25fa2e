"""`bench --endpoint URL1 --endpoint URL2`: two `longreach serve` processes of the lab model
share one grid; their rows equal one server's, a server killed mid-run loses no cell."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections import Counter
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from serving import running_server
from typer.testing import CliRunner

from longreach.bench import BenchConfig, ResultStore
from longreach.bench.endpoint import EndpointConfig, run_endpoint_bench
from longreach.bench.endpoint_backend import run_endpoints_bench
from longreach.bench.thread_executor import ThreadExecutor
from longreach.cli import app
from longreach.errors import LongreachError

CELLS = 2 * 2 * 2 + 2 * 2  # passkey: lengths × depths × samples; perplexity: lengths × samples


def _config(db) -> BenchConfig:
    return BenchConfig(model="lab", tasks=["passkey", "perplexity:last=32,haystack=synthetic"],
                       lengths=[128, 200], depths=[0.25, 0.75], samples=2, db=str(db))  # fmt: skip


def _rows(db) -> dict[str, tuple]:
    """Per key: what must not depend on the server that computed it."""
    with ResultStore(db, create=False) as store:
        return {
            c.key: (c.score, c.context_tokens, c.new_tokens, c.output, c.meta["status"])
            for c in store.cells()
        }


def _endpoints_of(db) -> Counter:
    with ResultStore(db, create=False) as store:
        return Counter(c.meta["endpoint"] for c in store.cells())


@pytest.fixture(scope="module")
def servers():
    with ExitStack() as stack:
        yield [stack.enter_context(running_server("--model", "lab")) for _ in range(2)]


@pytest.fixture(scope="module")
def one_server_rows(servers, tmp_path_factory):
    db = tmp_path_factory.mktemp("one") / "one.db"
    result = run_endpoint_bench(_config(db), EndpointConfig(servers[0].base_url, "lab"))
    assert (result.total, result.computed) == (CELLS, CELLS)
    rows = _rows(db)
    assert all(r[-1] == "ok" for r in rows.values()), f"every cell fits the context: {rows}"
    return rows


def test_two_servers_store_one_servers_rows_and_a_rerun_recomputes_nothing(
    servers, one_server_rows, tmp_path
):
    db = tmp_path / "two.db"
    targets = [EndpointConfig(s.base_url, "lab", parallel=2) for s in servers]
    result = run_endpoints_bench(_config(db), targets)
    assert (result.total, result.computed, result.skipped, result.failed) == (CELLS, CELLS, 0, 0)
    assert _rows(db) == one_server_rows, "two servers stored other rows than one server"
    used = _endpoints_of(db)
    assert set(used) == {s.base_url for s in servers}, f"both servers compute cells: {used}"
    assert sum(used.values()) == CELLS
    with ResultStore(db, create=False) as store:
        before = {c.key: (c.run_id, c.created_at) for c in store.cells()}

    again = run_endpoints_bench(_config(db), targets)
    assert (again.computed, again.skipped) == (0, CELLS), "the rerun recomputed cells"
    with ResultStore(db, create=False) as store:
        assert {c.key: (c.run_id, c.created_at) for c in store.cells()} == before


def test_a_server_killed_mid_run_hands_its_cells_to_the_other(servers, one_server_rows, tmp_path):
    db = tmp_path / "killed.db"
    stored: list[str] = []
    executor = ThreadExecutor()
    with running_server("--model", "lab") as victim:

        def on_event(event):
            if event.kind == "done":
                stored.append(event.cell.key)
                # kill once the victim has answered a cell (a fresh server can lag behind)
                by_victim = event.cell.meta.get("endpoint") == victim.url
                if by_victim and victim.process.poll() is None and len(stored) < CELLS:
                    victim.process.kill()

        targets = [EndpointConfig(u, "lab", timeout=3) for u in (servers[0].url, victim.url)]
        result = run_endpoints_bench(_config(db), targets, executor=executor, progress=on_event)
        assert victim.process.poll() is not None, "the test never killed the server"
    assert executor.lost == 1, f"expected 1 server out of service, saw {executor.lost}"
    assert (result.computed, result.failed) == (CELLS, 0)
    assert len(stored) == len(set(stored)) == CELLS, "a cell was delivered twice or lost"
    assert _rows(db) == one_server_rows, "after the kill the rows differ from one server's"
    used = _endpoints_of(db)
    assert 1 <= used[victim.url] < CELLS and used[servers[0].url] == CELLS - used[victim.url], used


def _imposter(card: dict):
    """A server with the real server's model card whose /tokenize gives other ids."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _json(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._json(card)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._json({"tokens": [ord(c) for c in body.get("prompt", "")]})

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


def test_servers_of_different_models_are_refused_in_one_line(servers, tmp_path):
    with urllib.request.urlopen(servers[0].base_url + "/models") as reply:
        card = json.load(reply)
    httpd = _imposter(card)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    other = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        targets = [EndpointConfig(servers[0].base_url, "lab"), EndpointConfig(other, "lab")]
        with pytest.raises(LongreachError) as info:
            run_endpoints_bench(_config(tmp_path / "x.db"), targets)
        assert str(info.value) == (
            f"--endpoint {other} does not serve the model of {servers[0].base_url}: it "
            "tokenizes a probe text differently; every --endpoint must serve the same model."
        )
        args = ["bench", "--endpoint", servers[0].base_url, "--endpoint", other,
                "--served-model", "lab", "--lengths", "128", "--db", str(tmp_path / "y.db")]  # fmt: skip
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 2, out.output
        assert f"error: {info.value}" in out.output.splitlines(), out.output
        assert "Traceback" not in out.output
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not (tmp_path / "x.db").exists(), "nothing is written before the servers agree"


def test_cli_two_endpoints_then_rerun(servers, tmp_path):
    db = tmp_path / "cli.db"
    args = ["bench", "--endpoint", servers[0].base_url, "--endpoint", servers[1].base_url,
            "--served-model", "lab", "--task", "passkey", "--lengths", "128", "--samples", "4",
            "--parallel", "2", "--db", str(db)]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "4 cells computed, 0 already in" in first.output, first.output
    assert "passkey" in first.output and "128" in first.output, first.output
    assert set(_endpoints_of(db)) == {s.base_url for s in servers}
    second = CliRunner().invoke(app, args)
    assert "0 cells computed, 4 already in" in second.output, second.output


@pytest.mark.slow
def test_ray_workers_send_the_requests(servers, one_server_rows, tmp_path):
    ray = pytest.importorskip("ray")
    from longreach.bench.ray_executor import RayExecutor

    ray.init(
        num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, logging_level="ERROR"
    )
    try:
        db = tmp_path / "ray.db"
        targets = [EndpointConfig(s.base_url, "lab", parallel=2) for s in servers]
        result = run_endpoints_bench(_config(db), targets, executor=RayExecutor(workers=2))
        assert (result.computed, result.failed) == (CELLS, 0)
        assert _rows(db) == one_server_rows, "Ray workers stored other rows than one server"
        assert set(_endpoints_of(db)) == {s.base_url for s in servers}

        killed_db = tmp_path / "ray-killed.db"
        stored: list[str] = []
        executor = RayExecutor(workers=2)
        with running_server("--model", "lab") as victim:

            def on_event(event):
                if event.kind == "done":
                    stored.append(event.cell.key)
                    if len(stored) == 2:
                        victim.process.kill()

            targets = [EndpointConfig(u, "lab", timeout=3) for u in (servers[0].url, victim.url)]
            result = run_endpoints_bench(
                _config(killed_db), targets, executor=executor, progress=on_event
            )
        assert executor.lost == 1, f"expected 1 worker to lose its server, saw {executor.lost}"
        assert (result.computed, result.failed) == (CELLS, 0)
        assert len(stored) == len(set(stored)) == CELLS, "a cell was delivered twice or lost"
        assert _rows(killed_db) == one_server_rows
    finally:
        ray.shutdown()


class _Backend:
    """A backend that finishes cells at once, and goes out of service on the poisoned one."""

    def __init__(self, poison: str) -> None:
        self.poison, self.down, self.ran = poison, False, []

    def open(self):
        from longreach.bench.executors import ModelFacts

        return ModelFacts("fake", "f" * 16, None)

    def preflight(self, cells):
        pass

    def run(self, cells):
        from longreach.bench.executors import BackendDown, CellFailure

        (cell,) = cells
        if self.down or cell.key == self.poison:
            self.down = True
            return [BackendDown(cell.key, "the server is gone")]
        self.ran.append(cell.key)
        return [CellFailure(cell.key, "done")]  # any outcome: the executor only hands it on


def test_thread_executor_gives_cells_back_up_to_a_bound():
    from longreach.bench.plan import build_plan, load_tasks

    config = _config("unused.db")
    plan = build_plan(config, ["vanilla"], load_tasks(config), "f" * 16)
    poison = plan[0].key
    backends = [_Backend(poison) for _ in range(3)]
    executor = ThreadExecutor(max_attempts=2)
    executor.start(backends)
    outcomes: dict[str, list] = {}
    executor.map(plan, lambda c, w: None, lambda c, o: outcomes.setdefault(c.key, []).append(o))
    assert sorted(outcomes) == sorted(c.key for c in plan), "every cell has one outcome"
    assert all(len(v) == 1 for v in outcomes.values()), "no cell was handed on twice"
    bad = outcomes[poison][0]
    assert (bad.attempts, bad.error) == (2, "2 backends failed under it (last: the server is gone)")
    assert executor.lost == 2 and sum(b.down for b in backends) == 2
    survivor = next(b for b in backends if not b.down)
    assert len(survivor.ran) + sum(len(b.ran) for b in backends if b.down) == len(plan) - 1

    executor = ThreadExecutor(max_attempts=3)
    executor.start([_Backend(plan[0].key), _Backend(plan[1].key)])
    with pytest.raises(LongreachError) as info:
        executor.map(plan, lambda c, w: None, lambda c, o: None)
    assert str(info.value) == (
        f"every backend went out of service (last: the server is gone); {len(plan)} cells were "
        "not computed; finished cells are saved: run the command again."
    )


def _refuser():
    """A server (no /tokenize) that answers the calibration probe, then 400s every stream."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _json(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._json(200, {"object": "list", "data": [{"id": "fake"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/completions":
                return self._json(404, {"error": {"message": "File Not Found", "code": 404}})
            if not body.get("stream"):
                usage = {"prompt_tokens": len(body["prompt"]) // 4, "completion_tokens": 1}
                return self._json(200, {"choices": [{"index": 0, "text": " x"}], "usage": usage})
            self._json(400, {"error": {"message": "temperature must be <= 2", "code": 400}})

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


def test_a_cell_refused_for_its_own_reason_is_stored_with_the_error(tmp_path):
    httpd = _refuser()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        config = BenchConfig(model="fake", tasks=["passkey"], lengths=[128, 200], samples=2,
                             db=str(tmp_path / "refused.db"))  # fmt: skip
        result = run_endpoints_bench(config, [EndpointConfig(url, "fake", timeout=5)])
        assert (result.total, result.computed, result.failed) == (4, 0, 4)
        with ResultStore(config.db, create=False) as store:
            cells = store.cells()
        assert [c.meta["error"] for c in cells] == [
            f"{url} refused a request (400): temperature must be <= 2"
        ] * 4
        assert all(c.score is None and c.meta["attempts"] == 1 for c in cells)
        again = run_endpoints_bench(config, [EndpointConfig(url, "fake", timeout=5)])
        assert (again.computed, again.skipped) == (0, 4), "a failed cell is not recomputed"
    finally:
        httpd.shutdown()
        httpd.server_close()
