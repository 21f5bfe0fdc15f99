"""The search page in a real headless Chromium, against `uvicorn main:app` on 127.0.0.1.

The catalogue is the Caltech photos indexed with the tests' fake model: the page is the
point here, not the model. Screenshots land in test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright
from support import ROOT, LiveServer, image_bytes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
ARTIFACTS = ROOT / "test-artifacts"
TIMEOUT_MS = 20_000

CARDS_READY = """n => {
    const cards = document.querySelectorAll('#results .card');
    return cards.length === n
        && !document.querySelector('#results').hasAttribute('aria-busy')
        && [...cards].every(c => c.querySelector('img').complete);
}"""


@pytest.fixture(scope="module")
def server(caltech_index) -> Iterator[LiveServer]:
    with LiveServer({"IMAGEFINDER_DB": str(caltech_index)}, fake_model=True) as live:
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as e:
            pytest.fail(f"cannot start {CHROMIUM} (install it with: apt-get install chromium): {e}")
        yield chromium
        chromium.close()


def open_page(browser: Browser, url: str, width: int = 1100, height: int = 800):
    """A fresh page on ``url`` that records every request and script error it sees."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.requests, page.script_errors = [], []
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("pageerror", lambda e: page.script_errors.append(str(e)))
    page.goto(url + "/")
    return page


@pytest.fixture
def page(browser, server) -> Iterator[Page]:
    page = open_page(browser, server.url)
    yield page
    assert page.script_errors == []
    # Offline by design: everything comes from this server (or is the user's own file).
    elsewhere = [u for u in page.requests if not u.startswith((server.url, "blob:", "data:"))]
    assert elsewhere == []
    page.context.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory, caltech_dir) -> Path:
    """A real photo that is not in the catalogue: a smaller, recompressed copy of one
    that is (its nearest by a wide margin, with the fake model as with a real one)."""
    original = Image.open(caltech_dir / "pagoda" / "image_0004.jpg")
    w, h = original.size
    path = tmp_path_factory.mktemp("upload") / "my-pagoda.jpg"
    original.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.LANCZOS).save(path, quality=70)
    return path


def wait_for_cards(page: Page, n: int) -> list[str]:
    """Wait for ``n`` result cards with their thumbnails loaded; return their ids."""
    page.wait_for_function(CARDS_READY, arg=n)
    widths = page.eval_on_selector_all(
        "#results .card img", "imgs => imgs.map(i => i.naturalWidth)"
    )
    assert len(widths) == n and all(w > 0 for w in widths), widths
    return page.eval_on_selector_all("#results .card", "cards => cards.map(c => c.dataset.id)")


def query_image_loaded(page: Page) -> bool:
    page.wait_for_function("document.querySelector('#query-img').complete")
    return page.eval_on_selector("#query-img", "i => i.naturalWidth > 0")


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_an_upload_shows_its_nearest_catalogue_images(page, photo):
    # Tab visits the two views (Search, Duplicates), then the drop zone: a labelled file
    # input, the first stop of the search itself.
    stops = []
    for _ in range(3):
        page.keyboard.press("Tab")
        stops.append(page.evaluate("document.activeElement.id"))
    assert stops == ["nav-search", "nav-duplicates", "file"]
    assert page.get_by_label("Drop an image here").evaluate("e => e.type") == "file"
    page.set_input_files("#file", str(photo))
    ids = wait_for_cards(page, 3)  # k defaults to 3
    # The photo it was made from is the nearest.
    assert ids[0] == "pagoda/image_0004"
    assert page.inner_text("#query-heading") == "Your image"
    assert query_image_loaded(page)
    cards = page.locator("#results .card")
    assert re.fullmatch(r"pagoda/\s*image_0004\s+distance \d\.\d{3}", cards.first.inner_text())
    alts = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.alt)")
    assert all(alts), alts
    screenshot(page, "browser-upload.png")


def test_a_result_searches_with_itself_by_click_or_keyboard(page, photo):
    page.set_input_files("#file", str(photo))
    first = wait_for_cards(page, 3)

    page.locator("#results .card").nth(1).click()
    page.wait_for_function(
        f"document.querySelector('#query-heading').textContent === {json.dumps(first[1])}"
    )
    walked = wait_for_cards(page, 3)
    assert first[1] not in walked and walked != first
    assert query_image_loaded(page)
    assert "#id=" in page.url

    # Keyboard only: Tab reaches a result card and Enter searches with it.
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('card')"):
            break
    else:
        pytest.fail("Tab never reached a result card")
    target = page.evaluate("document.activeElement.dataset.id")
    page.keyboard.press("Enter")
    page.wait_for_function(
        f"document.querySelector('#query-heading').textContent === {json.dumps(target)}"
    )
    assert target not in wait_for_cards(page, 3)

    # Back walks back.
    page.go_back()
    page.wait_for_function(
        f"document.querySelector('#query-heading').textContent === {json.dumps(first[1])}"
    )
    assert wait_for_cards(page, 3) == walked


def test_changing_k_changes_how_many_results(page, photo):
    page.set_input_files("#file", str(photo))
    wait_for_cards(page, 3)
    page.fill("#k", "5")
    wait_for_cards(page, 5)
    page.fill("#k", "1")
    page.press("#k", "Enter")
    wait_for_cards(page, 1)
    # A walk through the catalogue, eight at a time.
    page.fill("#k", "8")
    target = wait_for_cards(page, 8)[2]
    page.locator("#results .card").nth(2).click()
    page.wait_for_function(
        f"document.querySelector('#query-heading').textContent === {json.dumps(target)}"
    )
    assert target not in wait_for_cards(page, 8)
    assert query_image_loaded(page)
    page.mouse.move(0, 0)
    page.wait_for_timeout(300)  # let the card's hover transition finish before the picture
    screenshot(page, "browser-results.png")


def test_a_text_file_gets_an_inline_explanation(page, photo, tmp_path):
    page.set_input_files("#file", str(photo))
    wait_for_cards(page, 3)
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list: milk, eggs\n")
    page.set_input_files("#file", str(notes))
    alert = page.locator("#error[role=alert]")
    alert.wait_for(state="visible")
    assert "not an image" in alert.inner_text()
    assert page.locator("#results .card").first.is_hidden()
    assert page.locator("#query").is_hidden()
    screenshot(page, "browser-not-an-image.png")


def test_an_empty_index_and_a_too_large_file_are_explained_inline(browser, tmp_path):
    db = tmp_path / "never-built.db"
    env = {"IMAGEFINDER_DB": str(db), "IMAGEFINDER_MAX_UPLOAD_BYTES": "50000"}
    small, large = tmp_path / "small.jpg", tmp_path / "large.png"
    small.write_bytes(image_bytes((64, 64)))
    Image.effect_noise((400, 400), 80).convert("RGB").save(large)
    assert large.stat().st_size > 50_000
    with LiveServer(env) as live:
        page = open_page(browser, live.url)
        assert "No images indexed yet" in page.inner_text("#status")
        page.set_input_files("#file", str(small))
        alert = page.locator("#error[role=alert]")
        alert.wait_for(state="visible")
        assert "nothing to compare with" in alert.inner_text()
        command = page.inner_text("#error code")
        assert command.startswith("python extract_image_features.py --folder ")
        assert command.endswith(f"--db .../{db.name}")  # public: no absolute path
        screenshot(page, "browser-empty-index.png")

        searches = page.requests.count(live.url + "/similarity-search")
        page.set_input_files("#file", str(large))
        page.wait_for_function("document.querySelector('#error').textContent.includes('too large')")
        assert "The limit is 49 KB." in alert.inner_text()  # 50,000 bytes
        # Refused before sending: the page knows the server's cap.
        assert page.requests.count(live.url + "/similarity-search") == searches == 1
        assert page.script_errors == []
        page.context.close()


def test_the_page_fits_a_phone(browser, server, photo):
    page = open_page(browser, server.url, width=390, height=844)
    page.set_input_files("#file", str(photo))
    wait_for_cards(page, 3)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    boxes = [page.locator("#results .card").nth(i).bounding_box() for i in range(3)]
    assert all(b["x"] >= 0 and b["x"] + b["width"] <= 390 for b in boxes), boxes
    screenshot(page, "browser-phone.png")
    page.context.close()


@pytest.mark.parametrize(
    "raw",
    [
        "/images/../../../../etc/passwd",
        "/images/..%2F..%2F..%2Fetc%2Fpasswd",
        "/images//etc/passwd",
    ],
)
def test_raw_traversal_over_http_finds_nothing(server, raw):
    """Sent as-is (clients normally collapse '..' before sending; an attacker's does not)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", raw + "/thumbnail")
    thumb = conn.getresponse()
    body = thumb.read()
    assert thumb.status == 404 and json.loads(body)["error"]["code"] == "unknown_id"
    conn.request("GET", raw)
    image = conn.getresponse()
    body = image.read()
    conn.close()
    assert image.status == 404 and b"root:" not in body
    assert json.loads(body)["error"]["status"] == 404


@pytest.mark.parametrize(
    "path, rendered",
    [
        ("/docs", ".swagger-ui .opblock-summary-path"),
        ("/redoc", "[role=menuitem], .menu-content li"),
    ],
)
def test_the_api_docs_render_offline_under_the_content_security_policy(
    browser, server, path, rendered
):
    """Swagger UI and ReDoc come from this server (the fastapi-offline package's
    assets), render every route, and break no rule of the page's CSP. (ReDoc's bundle
    asks for its own logo from its CDN: the CSP refuses it before it leaves the browser,
    and ReDoc hides the broken image.)"""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    requested: list[str] = []
    console: list[str] = []
    page.on("requestfinished", lambda r: requested.append(r.url))
    page.on("console", lambda m: console.append(m.text))
    page.on("pageerror", lambda e: console.append(str(e)))
    response = page.goto(server.url + path)
    assert (
        response is not None
        and "frame-ancestors 'none'" in response.headers["content-security-policy"]
    )
    # A selector, not wait_for_function: a predicate string is evaluated with eval(),
    # which this very CSP refuses once the first poll misses.
    page.wait_for_selector(rendered, state="attached")
    text = page.inner_text("body")
    assert "/similarity-search" in text and "ImageFinder" in text
    elsewhere = [u for u in requested if not u.startswith((server.url, "blob:", "data:"))]
    assert elsewhere == []
    refused = [m for m in console if "Content Security Policy" in m or "Refused" in m]
    assert all("cdn.redoc.ly/redoc/logo-mini.svg" in m for m in refused), refused
    screenshot(page, f"docs{path.replace('/', '-')}.png")
    context.close()


# -- several indexes, and text search ----------------------------------------------------


@pytest.fixture(scope="module")
def two_indexes(tmp_path_factory, model) -> Iterator[LiveServer]:
    """A server over coloured pictures with two indexes: ``pictures`` (the image-only fake
    model, the default) and ``words`` (fake-clip, which reads colour names)."""
    import fake_model

    from imagefinder.indexer import index_folder
    from imagefinder.model.embedder import load_embedder
    from imagefinder.store import open_store

    root = tmp_path_factory.mktemp("two")
    folder = root / "images"
    folder.mkdir()
    colours = {"red": (220, 30, 30), "blue": (30, 40, 210), "green": (30, 170, 40)}
    for name, rgb in colours.items():
        for shade in range(3):
            colour = tuple(c + 8 * shade for c in rgb)
            (folder / f"{name}{shade}.png").write_bytes(image_bytes((64, 48), colour, "PNG"))
    for embedder, db in ((model, "pictures.db"), (load_embedder(fake_model.TEXT_NAME), "words.db")):
        store = open_store(str(root / db))
        index_folder(folder, store, embedder)
        store.close()
    env = {
        "IMAGEFINDER_DB": f"pictures={root / 'pictures.db'},words={root / 'words.db'}",
        "IMAGEFINDER_IMAGES_DIR": str(folder),
    }
    with LiveServer(env, fake_model=True) as live:
        yield live


def test_the_page_lets_the_user_pick_an_index_and_search_by_text(browser, two_indexes):
    page = open_page(browser, two_indexes.url)
    page.wait_for_function("document.querySelector('#index').options.length === 2")
    assert page.locator("#index-field").is_visible()
    assert page.locator("#text-form").is_hidden()  # the default index reads no text
    assert "9 images indexed with fake-colour" in page.inner_text("#status")
    page.select_option("#index", "words")
    assert page.locator("#text-form").is_visible()
    assert "with fake-clip" in page.inner_text("#status")
    page.fill("#text", "something blue")
    page.press("#text", "Enter")
    ids = wait_for_cards(page, 3)
    assert sorted(ids) == ["blue0", "blue1", "blue2"]
    assert page.inner_text("#query-heading") == "“something blue”"
    assert page.locator("#query-img").is_hidden()
    screenshot(page, "text-search.png")
    # Walking on from a result searches the chosen index, thumbnails included.
    page.locator("#results .card").first.click()
    wait_for_cards(page, 3)
    asked = [u for u in page.requests if "/similar?" in u or "/thumbnail" in u]
    assert asked and all("index=words" in u for u in asked)
    assert page.script_errors == []
    page.context.close()


def test_the_add_panel_starts_a_job_follows_it_and_lists_its_failures(browser, tmp_path):
    """A fresh server with a token: the panel keeps the token in sessionStorage only,
    uploads images as a job, shows its progress to the end, lists the file that failed,
    and the catalogue then holds the images (the status line and a search say so)."""
    token = "panel-token-for-tests"
    env = {
        "IMAGEFINDER_DB": str(tmp_path / "index.db"),
        "IMAGEFINDER_IMAGES_DIR": str(tmp_path / "images"),
        "IMAGEFINDER_MODEL": "fake-colour",
        "IMAGEFINDER_API_TOKEN": token,
        "IMAGEFINDER_JOB_BATCH_SIZE": "2",
        "FAKE_MODEL_BATCH_SECONDS": "0.2",  # slow enough to see it running
    }
    chosen = []
    for i, colour in enumerate([(220, 30, 30), (30, 200, 40), (20, 40, 230), (240, 220, 20)]):
        path = tmp_path / f"shot-{i}.jpg"
        path.write_bytes(image_bytes((80, 60), colour))
        chosen.append(str(path))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a picture")
    chosen.append(str(broken))
    with LiveServer(env, fake_model=True) as live:
        page = open_page(browser, live.url)
        page.click("#add summary")
        page.fill("#add-token", "wrong")
        page.set_input_files("#add-files", chosen[:1])
        page.click("#add-start")
        page.wait_for_function(
            "() => document.querySelector('#add-state').textContent.includes('token is missing or wrong')"
        )
        page.fill("#add-token", token)
        page.set_input_files("#add-files", chosen)
        page.click("#add-start")
        # The bar moves while the job runs, and the job ends done.
        page.wait_for_function("() => document.querySelector('#add-progress').value > 0")
        page.wait_for_function(
            "() => document.querySelector('#add-state').textContent.startsWith('Done')"
        )
        assert page.inner_text("#add-state") == "Done: 4 added, 0 already there, 1 failed"
        assert page.eval_on_selector("#add-progress", "p => [p.value, p.max]") == [5, 5]
        failures = page.inner_text("#add-failures")
        assert failures.startswith("broken: ") and "image" in failures
        page.wait_for_function(
            "() => document.querySelector('#status').textContent.startsWith('4 images')"
        )
        # The token is in this tab's sessionStorage, nowhere else, and never in a URL.
        assert page.evaluate("sessionStorage.getItem('imagefinder-token')") == token
        assert page.evaluate("localStorage.length") == 0
        assert page.context.cookies() == []
        assert not any(token in url for url in page.requests)
        screenshot(page, "browser-add-panel.png")
        # What the job added can be searched for.
        page.set_input_files("#file", chosen[2])
        assert wait_for_cards(page, 3)[0] == "shot-2"
        assert page.script_errors == []
        page.context.close()


# -- duplicates, metadata, paging and several query images ------------------------------


@pytest.fixture(scope="module")
def shop(tmp_path_factory, caltech_dir, model) -> Iterator[LiveServer]:
    """Real photos of three classes with a ``class`` each, a re-encoded copy of one and a
    byte copy of another, served with the fake model (calibrated like the real ones)."""
    import shutil

    from imagefinder.indexer import index_folder
    from imagefinder.store import open_store

    root = tmp_path_factory.mktemp("shop")
    folder = root / "images"
    folder.mkdir()
    classes = ("pagoda", "ewer", "trilobite")
    for name in classes:
        for path in sorted((caltech_dir / name).glob("*.jpg"))[:6]:
            shutil.copy(path, folder / f"{name}-{path.stem}.jpg")
    first = sorted(folder.glob("pagoda-*.jpg"))[0]
    Image.open(first).save(folder / "pagoda-reencoded.jpg", "JPEG", quality=40)
    shutil.copy(sorted(folder.glob("ewer-*.jpg"))[0], folder / "ewer-copy.jpg")
    store = open_store(str(root / "shop.db"))
    index_folder(folder, store, model)
    store.set_metadata(
        (p.stem, {"class": p.stem.split("-")[0], "shelf": "top" if i % 2 else "bottom"})
        for i, p in enumerate(sorted(folder.glob("*.jpg")))
    )
    store.close()
    env = {"IMAGEFINDER_DB": str(root / "shop.db"), "IMAGEFINDER_IMAGES_DIR": str(folder)}
    with LiveServer(env, fake_model=True) as live:
        live.folder = folder
        yield live


def test_the_duplicates_view_shows_groups_as_rows(browser, shop):
    expected = requests_json(shop.url + "/duplicates?level=near")
    assert expected["total_groups"] >= 2
    page = open_page(browser, shop.url)
    page.click("#nav-duplicates")
    wait_until(
        page,
        "n => document.querySelectorAll('#groups .group').length === n",
        arg=expected["total_groups"],
    )
    assert page.locator("#search-view").is_hidden()
    rows = page.eval_on_selector_all(
        "#groups .group",
        "gs => gs.map(g => [...g.querySelectorAll('.dup-card')].map(c => c.dataset.id))",
    )
    assert rows == [[i["id"] for i in g["images"]] for g in expected["groups"]]
    wait_until(
        page,
        "[...document.querySelectorAll('#groups img')].every(i => i.complete && i.naturalWidth > 0)",
    )
    assert "distance 0." in page.inner_text("#groups")
    screenshot(page, "duplicates.png")
    page.select_option("#dup-level", "exact")
    wait_until(page, "document.querySelectorAll('#groups .group').length === 1")
    assert sorted(
        page.eval_on_selector_all("#groups .dup-card", "cs => cs.map(c => c.dataset.id)")
    ) == [
        "ewer-copy",
        "ewer-image_0001",
    ]
    # A member searches with itself, back on the search view.
    page.locator("#groups .dup-card").first.click()
    wait_for_cards(page, 3)
    assert page.locator("#duplicates-view").is_hidden()
    assert page.inner_text("#query-heading") in ("ewer-copy", "ewer-image_0001")
    assert page.script_errors == []
    page.context.close()


def wait_until(page: Page, predicate: str, arg: object = None, timeout: float = 15.0) -> None:
    """Poll ``predicate`` (a JS expression, or a function of ``arg``) from Python until
    it holds: ``wait_for_function`` re-evaluates a string predicate with eval() in the
    page after its first miss, which the page's CSP refuses."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(predicate, arg):
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        page.wait_for_timeout(50)


def requests_json(url: str) -> dict:
    import requests

    response = requests.get(url, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_metadata_filters_more_results_and_several_images_on_the_page(browser, shop):
    page = open_page(browser, shop.url)
    photos = sorted(shop.folder.glob("pagoda-image_*.jpg"))
    page.set_input_files("#file", [str(photos[1]), str(photos[2])])
    ids = wait_for_cards(page, 3)
    assert page.inner_text("#query-heading") == "Your 2 images"
    assert photos[1].stem not in ids and photos[2].stem not in ids  # the query itself
    # Each card shows its metadata; a value keeps only the images that share it.
    chips = page.locator("#results .chip")
    assert chips.count() == 6
    page.locator("#results .chip", has_text="shelf: top").first.click()
    wait_until(page, "!document.querySelector('#filters').hidden")
    wait_for_cards(page, 3)
    shelves = page.eval_on_selector_all(
        "#results .result",
        "rs => rs.map(r => r.querySelector('[data-column=shelf]').dataset.value)",
    )
    assert shelves == ["top"] * 3
    assert "with shelf top" in page.inner_text("#results-summary")
    # More results: the next page, below the first.
    page.click("#more")
    more = wait_for_cards(page, 6)
    assert len(set(more)) == 6
    # Removing the filter searches again without it.
    page.click("#filter-chips .chip")
    wait_until(page, "document.querySelector('#filters').hidden")
    wait_for_cards(page, 3)
    screenshot(page, "metadata.png")
    assert page.script_errors == []
    page.context.close()
