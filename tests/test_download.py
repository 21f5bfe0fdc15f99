"""The downloader against a real HTTP server on 127.0.0.1 (tests/image_server.py).

Timeouts and backoff are shrunk through ``DownloadOptions`` so failures are quick;
everything else (sockets, retries, redirects, temp files, decoding) is the real thing.
"""

from __future__ import annotations

import csv
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from image_server import JPEG, PNG, ImageServer

from imagefinder.catalog import Row, parse_catalog
from imagefinder.cli import cli
from imagefinder.download import (
    MANIFEST_FIELDS,
    USER_AGENT,
    Downloader,
    DownloadOptions,
    Outcome,
)
from imagefinder.files import TEMP_PREFIX

# The test server is on 127.0.0.1: a private address, refused unless allowed.
FAST = DownloadOptions(
    timeout=3.0, retries=2, backoff=0.01, max_bytes=100_000, workers=4, allow_private=True
)


@pytest.fixture(scope="module")
def server():
    with ImageServer(slow_seconds=2.0, pause_seconds=0.5, huge_bytes=300_000) as s:
        yield s


def fetch(server: ImageServer, out: Path, path: str, image_id: str = "x", **options) -> Outcome:
    row = Row(2, server.url(path), image_id)
    return Downloader(out, replace(FAST, **options)).fetch_row(row)


def files_in(folder: Path) -> list[str]:
    """Everything in ``folder``, hidden temporary files included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def catalog(
    tmp_path: Path, server: ImageServer, rows: list[tuple[str, str]], raw: str = ""
) -> Path:
    path = tmp_path / "images.csv"
    lines = ["url,id"] + [f"{server.url(p) if p.startswith('/') else p},{i}" for p, i in rows]
    path.write_text(raw or "\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_manifest(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return {r["line"]: r for r in csv.DictReader(f)}


# -- one response, one outcome -------------------------------------------------


@pytest.mark.parametrize(
    "path, saved_as, body",
    [
        ("/img/a.jpg", "x.jpg", JPEG),
        ("/img/a.png", "x.png", PNG),
        ("/png-named.jpg", "x.png", PNG),  # extension from the decoded bytes, not the url
        ("/redirect", "x.jpg", JPEG),
    ],
)
def test_good_images_are_saved_as_id_dot_decoded_format(server, tmp_path, path, saved_as, body):
    outcome = fetch(server, tmp_path, path)
    assert (outcome.status, outcome.reason) == ("downloaded", "")
    assert outcome.path == str(tmp_path / saved_as)
    assert outcome.bytes == len(body)
    assert files_in(tmp_path) == [saved_as]
    assert (tmp_path / saved_as).read_bytes() == body


def test_a_redirect_is_followed(server, tmp_path):
    before = server.count("/img/redirected.jpg")
    assert fetch(server, tmp_path, "/redirect").status == "downloaded"
    assert server.count("/img/redirected.jpg") == before + 1


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/missing", "HTTP 404"),
        ("/page.html", "not an image (text/html)"),
        ("/truncated.jpg", "not an image (image/jpeg): corrupt or truncated image"),
        ("/redirect-ftp", "redirected to a refused url: unsupported url scheme 'ftp'"),
        ("/huge", "300,000 bytes, over the 100,000 byte limit"),
        ("/huge-undeclared", "more than the 100,000 byte limit"),
    ],
)
def test_bad_responses_fail_once_with_a_reason_and_leave_no_file(server, tmp_path, path, reason):
    before = server.count(path)
    outcome = fetch(server, tmp_path, path)
    assert outcome.status == "failed"
    assert reason in outcome.reason
    assert server.count(path) == before + 1, "a permanent failure is not retried"
    assert files_in(tmp_path) == []


def test_a_redirect_loop_is_cut_short(server, tmp_path):
    before = server.count("/loop")
    outcome = fetch(server, tmp_path, "/loop")
    assert (outcome.status, outcome.reason) == ("failed", "more than 5 redirects")
    assert server.count("/loop") == before + 6


def test_a_server_error_is_retried_then_fails(server, tmp_path):
    before = server.count("/error")
    outcome = fetch(server, tmp_path, "/error", retries=2)
    assert (outcome.status, outcome.reason) == ("failed", "HTTP 500 (after 3 attempts)")
    assert server.count("/error") == before + 3
    assert files_in(tmp_path) == []


def test_a_flaky_server_succeeds_on_retry(server, tmp_path):
    outcome = fetch(server, tmp_path, "/flaky/once")
    assert outcome.status == "downloaded"
    assert server.count("/flaky/once") == 2
    assert (tmp_path / "x.jpg").read_bytes() == JPEG


def test_retries_back_off(server, tmp_path):
    # Delays are backoff * 2**attempt with jitter in [0.5, 1.5): at least 0.5 * (0.2 + 0.4).
    start = time.monotonic()
    outcome = fetch(server, tmp_path, "/error", retries=2, backoff=0.2)
    assert outcome.status == "failed"
    assert time.monotonic() - start >= 0.3


def test_a_slow_server_times_out_and_is_retried(server, tmp_path):
    before = server.count("/slow")
    start = time.monotonic()
    outcome = fetch(server, tmp_path, "/slow", timeout=0.3, retries=1)
    assert outcome.status == "failed"
    assert outcome.reason == "127.0.0.1 stopped answering (timed out) (after 2 attempts)"
    assert server.count("/slow") == before + 2
    assert time.monotonic() - start < server.slow_seconds * 2
    assert files_in(tmp_path) == []


def test_a_connection_dropped_mid_body_is_retried_then_fails(server, tmp_path):
    before = server.count("/dropped.jpg")
    outcome = fetch(server, tmp_path, "/dropped.jpg", retries=1)
    assert outcome.status == "failed"
    assert "(after 2 attempts)" in outcome.reason
    assert server.count("/dropped.jpg") == before + 2
    assert files_in(tmp_path) == []


def test_the_server_sees_our_user_agent(server, tmp_path):
    fetch(server, tmp_path, "/img/ua.jpg")
    agents = [h.get("User-Agent") for p, h in server.requests if p == "/img/ua.jpg"]
    assert agents and all(a == USER_AGENT for a in agents)
    assert USER_AGENT.startswith("ImageFinder/")


def test_rows_with_a_csv_problem_are_not_fetched(server, tmp_path):
    (row,) = parse_catalog(f"url,id\n{server.url('/img/never.jpg')},../evil\n".encode())
    outcome = Downloader(tmp_path, FAST).fetch_row(row)
    assert outcome.status == "failed" and "not safe as a file name" in outcome.reason
    assert server.count("/img/never.jpg") == 0


# -- atomic files and re-runs ----------------------------------------------------


def test_no_half_file_ever_appears_under_the_real_name(server, tmp_path):
    server.release.clear()
    result: list[Outcome] = []
    worker = threading.Thread(target=lambda: result.append(fetch(server, tmp_path, "/trickle.jpg")))
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not any(n.startswith(TEMP_PREFIX) for n in files_in(tmp_path)):
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.01)
        # Half the body has arrived: it lives in a hidden temporary file only.
        assert not (tmp_path / "x.jpg").exists()
    finally:
        server.release.set()
        worker.join(10)
    assert result[0].status == "downloaded"
    assert files_in(tmp_path) == ["x.jpg"]
    assert (tmp_path / "x.jpg").read_bytes() == JPEG


def test_temp_files_left_by_a_killed_run_are_swept(server, tmp_path):
    leftover = tmp_path / f"{TEMP_PREFIX}x.abc123.part"
    leftover.write_bytes(JPEG[:100])
    Downloader(tmp_path, FAST).run([Row(2, server.url("/img/a.jpg"), "x")])
    assert files_in(tmp_path) == ["x.jpg"]


def test_a_rerun_skips_good_files_without_asking_the_server(server, tmp_path):
    rows = parse_catalog(
        f"url,id\n{server.url('/img/r1.jpg')},r1\n{server.url('/img/r2.png')},r2\n".encode()
    )
    first = Downloader(tmp_path, FAST).run(rows)
    assert [o.status for o in first] == ["downloaded", "downloaded"]
    hits = server.count("/img/r1.jpg"), server.count("/img/r2.png")
    again = Downloader(tmp_path, FAST).run(rows)
    assert [(o.status, o.reason) for o in again] == [("skipped", "already downloaded")] * 2
    assert [o.path for o in again] == [str(tmp_path / "r1.jpg"), str(tmp_path / "r2.png")]
    assert (server.count("/img/r1.jpg"), server.count("/img/r2.png")) == hits


def test_a_broken_file_under_the_real_name_is_fetched_again(server, tmp_path):
    (tmp_path / "x.jpg").write_bytes(JPEG[:200])  # say, copied in by hand and cut short
    outcome = fetch(server, tmp_path, "/img/a.png")
    assert outcome.status == "downloaded"
    # The new file is a PNG; the broken JPEG must not linger as a twin of the same id.
    assert files_in(tmp_path) == ["x.png"]


def test_downloads_run_concurrently_and_outcomes_keep_csv_order(server, tmp_path):
    rows = [Row(line, server.url(f"/pause/p{line}.jpg"), f"p{line}") for line in range(2, 6)]
    start = time.monotonic()
    outcomes = Downloader(tmp_path, replace(FAST, workers=4)).run(rows)
    elapsed = time.monotonic() - start
    assert [o.id for o in outcomes] == ["p2", "p3", "p4", "p5"]
    assert all(o.status == "downloaded" for o in outcomes)
    # Four 0.5 s responses one after another would take 2 s.
    assert elapsed < 4 * server.pause_seconds * 0.75, elapsed


# -- the command: summary, manifest, exit status --------------------------------


def run_download(csv_path: Path, out: Path, *extra: str):
    return CliRunner().invoke(
        cli,
        ["download", "--csv_file", str(csv_path), "--output-dir", str(out),
         "--retries", "0", "--timeout", "3", "--allow-private", *extra],
    )  # fmt: skip


def test_download_command_summarises_and_writes_a_manifest(server, tmp_path):
    csv_path = catalog(
        tmp_path,
        server,
        [
            ("/img/c1.jpg", "c1"),
            ("/img/c2.png", "c2"),
            ("/missing", "gone"),
            ("/page.html", "html"),
            ("/img/c3.jpg", "c1"),
            ("/img/c4.jpg", "../up"),
            ("ftp://127.0.0.1/x.jpg", "ftp"),
        ],
    )
    out = tmp_path / "images"
    result = run_download(csv_path, out)
    assert result.exit_code == 0, result.output
    assert "Downloading" not in result.stderr  # no progress bar outside a terminal
    assert f"skipping {csv_path}:6: duplicate id 'c1' (first on line 2)" in result.stderr
    assert f"skipping {csv_path}:7: id '../up' is not safe as a file name" in result.stderr
    assert f"skipping {csv_path}:4: HTTP 404 ({server.url('/missing')})" in result.stderr
    manifest = out / "manifest.csv"
    assert result.stdout.strip() == (
        f"2 downloaded, 0 skipped (already there), 5 failed; manifest: {manifest}"
    )
    assert files_in(out) == ["c1.jpg", "c2.png", "manifest.csv"]

    rows = read_manifest(manifest)
    assert list(rows["2"]) == list(MANIFEST_FIELDS)
    assert sorted(rows) == ["2", "3", "4", "5", "6", "7", "8"]
    assert (rows["2"]["status"], rows["2"]["path"]) == ("downloaded", str(out / "c1.jpg"))
    assert rows["2"]["bytes"] == str(len(JPEG))
    assert (rows["4"]["status"], rows["4"]["reason"]) == ("failed", "HTTP 404")
    assert rows["5"]["reason"].startswith("not an image (text/html)")
    assert rows["6"]["reason"] == "duplicate id 'c1' (first on line 2)"
    assert "not safe as a file name" in rows["7"]["reason"]
    assert "unsupported url scheme 'ftp'" in rows["8"]["reason"]

    again = run_download(csv_path, out)
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith("0 downloaded, 2 skipped (already there), 5 failed")
    assert read_manifest(manifest)["2"]["reason"] == "already downloaded"


def test_download_command_fails_only_when_nothing_usable_came_down(server, tmp_path):
    csv_path = catalog(tmp_path, server, [("/missing", "a"), ("/page.html", "b")])
    result = run_download(csv_path, tmp_path / "images")
    assert result.exit_code == 1
    assert "0 downloaded, 0 skipped (already there), 2 failed" in result.stdout
    manifest = tmp_path / "images" / "manifest.csv"
    assert result.stderr.splitlines()[-1] == (
        f"Error: nothing usable was downloaded; reasons in {manifest}. "
        "Without network, try: make demo"
    )


def test_download_command_accepts_bom_and_crlf(server, tmp_path):
    raw = f"\ufeffurl,id\r\n{server.url('/img/b1.jpg')},b1\r\n{server.url('/img/b2.png')},b2\r\n"
    csv_path = catalog(tmp_path, server, [], raw=raw)
    out = tmp_path / "images"
    result = run_download(csv_path, out, "--manifest", str(tmp_path / "m.csv"))
    assert result.exit_code == 0, result.output
    assert files_in(out) == ["b1.jpg", "b2.png"]
    assert {r["id"] for r in read_manifest(tmp_path / "m.csv").values()} == {"b1", "b2"}


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "link,name\nhttp://a.test/1.jpg,one\n",
            ":1: header is 'link,name', missing column(s) url, id",
        ),
        ("url\nhttp://a.test/1.jpg\n", ":1: header is 'url', missing column(s) id"),
        ("", ": empty file; expected a header line 'url,id'"),
    ],
    ids=["wrong-header", "no-id-column", "empty"],
)
def test_download_command_rejects_a_bad_csv_in_one_line(server, tmp_path, text, message):
    csv_path = catalog(tmp_path, server, [], raw=text or " ")
    if not text:
        csv_path.write_bytes(b"")
    result = run_download(csv_path, tmp_path / "images")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {csv_path}{message}")
    assert result.stderr.count("\n") == 1


def test_download_command_names_a_missing_csv(tmp_path):
    result = run_download(tmp_path / "nope.csv", tmp_path / "images")
    assert result.exit_code == 2
    assert "nope.csv: no such file; pass the catalogue CSV with --csv_file" in result.stderr
