"""The report: figures, effective length, the page, and the page rendered in headless Chromium."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess

import pytest

from longreach.bench.report import write_report
from longreach.bench.store import Cell, ResultStore
from longreach.bench.summary import effective_length, summarize
from longreach.errors import LongreachError

METHODS = ("vanilla", "yarn:factor=4")
LENGTHS = (256, 512, 1024, 2048)


def _accuracy(method: str, length: int, depth: float) -> float:
    # vanilla collapses past its trained length (512); yarn holds on a little longer
    limit = 512 if method == "vanilla" else 1024
    return 1.0 if length <= limit else (0.5 if depth < 0.5 and method != "vanilla" else 0.0)


@pytest.fixture(scope="module")
def results_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "runs.db"
    rng = random.Random(0)
    with ResultStore(path) as store:
        run = store.start_run("tiny-model", "abc123", {"lengths": list(LENGTHS)}, {"torch": "2"})
        for method in METHODS:
            for length in LENGTHS:
                for idx in range(2):
                    for depth in (0.1, 0.5, 0.9):
                        score = _accuracy(method, length, depth)
                        store.add(
                            Cell(
                                model="tiny-model", model_fingerprint="abc123", method=method,
                                task="passkey:haystack=synthetic", prompt_format="raw",
                                length=length, depth=depth, seed=0, idx=idx, metric="accuracy",
                                score=score, expected=["12345"],
                                output=" 12345." if score else " <b>99</b> & more",
                                prompt="p", context_tokens=length - 3, trained_length=512,
                                shared_prefix_tokens=0 if depth == 0.1 else 40,
                                prefill_s=length / 1000 * rng.uniform(0.9, 1.1),
                                decode_tok_s=30.0, new_tokens=6,
                                peak_mem_bytes=(500 + length // 10) * 2**20, mem_kind="rss_peak",
                            ),
                            run,
                        )  # fmt: skip
                    store.add(
                        Cell(
                            model="tiny-model", model_fingerprint="abc123", method=method,
                            task="perplexity:haystack=pg,last=64", prompt_format="raw",
                            length=length, depth=None, seed=0, idx=idx, metric="perplexity",
                            score=20.0 if method != "vanilla" or length <= 512 else 400.0,
                            expected=[], output="nll=3", prompt="p", context_tokens=length,
                            trained_length=512, prefill_s=length / 900, peak_mem_bytes=600 * 2**20,
                            mem_kind="rss_peak",
                        ),
                        run,
                    )  # fmt: skip
    return path


def test_effective_length_rule():
    assert effective_length({1: 1.0, 2: 0.9, 4: 0.5, 8: 0.95}, 0.85) == 2  # 8 does not count
    assert effective_length({1: 0.5, 2: 1.0}, 0.85) is None
    assert effective_length({1: 0.85, 2: 0.85}, 0.85) == 2


def test_summary_rows(results_db):
    with ResultStore(results_db) as store:
        rows = summarize(store.cells(), 0.85)
    by = {(r.series.method, r.task.split(":")[0]): r for r in rows}
    assert by[("vanilla", "passkey")].effective == 512
    assert by[("yarn:factor=4", "passkey")].effective == 1024
    assert by[("vanilla", "passkey")].by_length[2048] == (0.0, 6)
    assert by[("yarn:factor=4", "passkey")].by_length[2048] == (pytest.approx(1 / 6), 6)
    assert by[("vanilla", "perplexity")].effective is None


def test_report_files_and_page(results_db, tmp_path):
    report = write_report(results_db, tmp_path / "out")
    names = sorted(p.name for p in report.images)
    assert names == [
        "tiny-model-abc123-accuracy-passkey-haystack-synthetic.png",
        "tiny-model-abc123-cost.png",
        "tiny-model-abc123-heatmap-passkey-haystack-synthetic.png",
        "tiny-model-abc123-perplexity-vs-retrieval.png",
    ]
    for image in report.images:
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 5000
    page = report.index.read_text()
    assert page.count('<img src="data:image/png;base64,') == 4, "images must be inlined"
    assert "http://" not in page and "https://" not in page, "the page must be self-contained"
    assert page.count("<tr><td") == report.cells == 64
    # effective length table: vanilla 512, yarn 1024
    assert re.search(r"<th>vanilla</th><td class='good'>512</td>", page)
    assert re.search(r"<th>yarn:factor=4</th><td class='good'>1k</td>", page)
    assert "&lt;b&gt;99&lt;/b&gt; &amp; more" in page, "outputs must be escaped"


def test_report_errors(tmp_path):
    with pytest.raises(LongreachError, match="does not exist"):
        write_report(tmp_path / "none.db", tmp_path / "out")
    ResultStore(tmp_path / "empty.db").close()
    with pytest.raises(LongreachError, match="holds no finished cells yet"):
        write_report(tmp_path / "empty.db", tmp_path / "out")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.skipif(
    _chromium() is None and not os.environ.get("CI"),
    reason="needs Chromium (Debian: apt-get install chromium; `make test` installs it as root)",
)
def test_report_renders_in_headless_chromium(results_db, tmp_path):
    assert _chromium() is not None, "CI must have Chromium: `make browser` installs it"
    report = write_report(results_db, tmp_path / "out")
    url = report.index.resolve().as_uri()
    common = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
        "--window-size=1280,2400",
    ]  # fmt: skip
    dom = subprocess.run(
        [*common, "--dump-dom", url], capture_output=True, text=True, timeout=180
    ).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, "the page's load script did not run"
    ok, total = int(loaded.group(1)), int(loaded.group(2))
    assert total == 4 and ok == total, f"only {ok} of {total} images loaded"
    shrunk = re.search(r'data-images-shrunk="(\d+)"', dom)
    assert shrunk and shrunk.group(1) == "0", "a figure is scaled down in a 1280-pixel window"

    shot = tmp_path / "shot.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", url],
        capture_output=True,
        timeout=180,
    )
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    not_white = (pixels < 0.9).any(axis=-1).mean()
    assert not_white > 0.05, f"the page looks blank ({not_white:.1%} of pixels are not white)"
    assert pixels.std() > 0.1
    # The charts are on the page: the methods' line colours, and the perplexity line's red.
    for name, rgb in (("blue", (31, 119, 180)), ("orange", (255, 127, 14)), ("red", (214, 39, 40))):
        close = (abs(pixels * 255 - rgb) < 12).all(axis=-1).sum()
        assert close > 200, f"the screenshot shows almost no {name} ({close} pixels)"
