"""Writers that meet: extract, the API and several server processes on one index.

- extract's writes are compare-and-set against the rows it scanned: an image the API
  added, replaced or deleted while extract ran is left as the API made it (never
  overwritten, resurrected or pruned).
- Two extracts with different models on a new index: one creates it, the other is
  refused; the index never mixes them.
- API writes are serialised across processes by the store (a file lock beside a
  SQLite index, an advisory lock in PostgreSQL), not by a Python lock.
- What a later full extract of a folder does to API changes for ids in that folder
  (README, "Writing over the API").
"""

from __future__ import annotations

import hashlib
import subprocess
import threading
from collections import Counter
from pathlib import Path

import fake_model
import numpy as np
import pytest
import requests
from support import ROOT, LiveServer, image_bytes

from imagefinder.indexer import index_folder
from imagefinder.store import FileState, Item, open_store

TOKEN = "race-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IDENTITY = {"model": "t", "weights": "w", "dim": "4", "preprocessing": "p"}


def item(image_id: str, path: str, sha: str = "a" * 64, dim: int = 4) -> Item:
    vector = np.zeros(dim, dtype=np.float32)
    vector[0] = 1
    return Item(image_id, path, sha, 1, 1, vector)


def test_conditional_writes_change_only_rows_still_as_expected(db_location):
    store = open_store(db_location)
    store.ensure_schema(IDENTITY)
    store.upsert([item("a", "/a.jpg"), item("b", "/b.jpg")])
    seen = store.file_states()
    store.upsert([item("a", "/a2.jpg", "b" * 64)])  # another writer replaces a
    store.delete(["b"])  # ...and deletes b

    # A stale writer: its view of a and b is out of date, c is new to both.
    written = store.upsert(
        [item("a", "/stale.jpg"), item("b", "/stale.jpg"), item("c", "/c.jpg")],
        expected={"a": seen["a"], "b": seen["b"]},
    )
    assert written == 1
    assert store.file_state("a").path == "/a2.jpg"  # not overwritten
    assert store.file_state("b") is None  # not resurrected
    assert store.file_state("c").path == "/c.jpg"
    # "Expected absent" loses to a row someone else created meanwhile.
    assert store.upsert([item("c", "/late.jpg")], expected={}) == 0
    assert store.file_state("c").path == "/c.jpg"
    # Deleting and touching are conditional the same way.
    assert store.delete(["a"], expected={"a": seen["a"]}) == 0
    assert not store.touch("a", "/moved.jpg", 2, 2, expected=seen["a"])
    current = store.file_state("a")
    assert store.touch("a", "/moved.jpg", 2, 2, expected=current)
    assert store.delete(["a"], expected={"a": store.file_state("a")}) == 1
    assert store.count() == 1
    store.close()


def photo(i: int) -> bytes:
    return image_bytes((48, 40), ((53 * i) % 256, (91 * i) % 256, 120))


def test_api_changes_during_an_extraction_are_never_undone(db_location, tmp_path, model):
    """The API replaces, deletes and adds images between extract's scan and its writes
    (deterministically: from the hook extract calls right after it scanned)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        (folder / f"p{i}.jpg").write_bytes(photo(i))
    store = open_store(db_location)
    index_folder(folder, store, model)
    for i in range(6):  # every file changes, so the next run re-embeds all of them
        (folder / f"p{i}.jpg").write_bytes(photo(i + 10))
    (folder / "p5.jpg").unlink()  # and one is gone: --prune would delete its row
    (folder / "new.jpg").write_bytes(photo(99))
    api = open_store(db_location)
    dim = fake_model.DIM

    def api_writes(_total: int) -> None:
        api.upsert(
            [
                item("p0", "/api/p0.png", "c" * 64, dim),
                item("p5", "/api/p5.png", "d" * 64, dim),
                item("new", "/api/new.png", dim=dim),
            ]
        )
        api.delete(["p1"])

    summary = index_folder(folder, store, model, prune=True, on_total=api_writes)
    assert store.file_state("p0").path == "/api/p0.png"  # the API's replacement stands
    assert store.file_state("p1") is None  # the API's delete stands
    assert store.file_state("p5").path == "/api/p5.png"  # replaced: not pruned
    assert store.file_state("new").path == "/api/new.png"
    assert store.file_state("p2").path == str((folder / "p2.jpg").resolve())
    assert summary.kept == 4 and summary.pruned == 0, summary
    assert "changed by another writer" in summary.line()
    store.close()
    api.close()


@pytest.mark.parametrize("attempt", range(3))
def test_two_extractions_with_different_models_never_mix_in_a_new_index(
    db_location, tmp_path, attempt
):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(8):
        (folder / f"p{i}.jpg").write_bytes(photo(i))
    runs = [
        subprocess.Popen(
            fake_model.command(
                "extract_image_features.py",
                "--folder",
                str(folder),
                "--db",
                db_location,
                "--model",
                name,
            ),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in (fake_model.NAME, fake_model.OTHER)
    ]
    results = [(p.wait(120), p.communicate()[1]) for p in runs]
    store = open_store(db_location)
    meta = store.meta()
    winner = [fake_model.NAME, fake_model.OTHER].index(meta["model"])
    assert results[winner][0] == 0, results[winner][1]
    code, err = results[1 - winner]
    assert code == 1 and "vectors from different models cannot be mixed" in err, err
    assert store.count() == 8
    dims = {len(it.vector) for page in store.iter_items() for it in page}
    assert dims == {int(meta["dim"])}
    store.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_catalogue(db_location: str, images: Path) -> dict[str, FileState]:
    """Every row's file exists and holds the row's content; no id has two files."""
    store = open_store(db_location)
    states = store.file_states()
    store.close()
    for image_id, state in states.items():
        path = Path(state.path)
        assert path.is_file(), (image_id, state)
        assert sha(path.read_bytes()) == state.sha256, image_id
    files = Counter(p.stem for p in images.iterdir() if not p.name.startswith("."))
    assert all(n == 1 for n in files.values()), files
    return states


def test_two_server_processes_writing_the_same_ids_stay_consistent(db_location, tmp_path):
    images = tmp_path / "images"
    env = {
        "IMAGEFINDER_DB": db_location,
        "IMAGEFINDER_IMAGES_DIR": str(images),
        "IMAGEFINDER_API_TOKEN": TOKEN,
        "IMAGEFINDER_MODEL": fake_model.NAME,
    }
    log = tmp_path / "servers.log"
    bodies = {
        "jpg": image_bytes((40, 30), (200, 10, 10)),
        "png": image_bytes((40, 30), (10, 200, 10), fmt="PNG"),
        "gif": image_bytes((40, 30), (10, 10, 200), fmt="GIF"),
    }
    with (
        LiveServer(env, fake_model=True, log=log) as a,
        LiveServer(env, fake_model=True, log=log) as b,
    ):
        requests.post(
            a.url + "/images",
            files={"file": ("x", bodies["jpg"])},
            data={"id": "seed"},
            headers=AUTH,
            timeout=30,
        ).raise_for_status()
        statuses: Counter[int] = Counter()
        lock = threading.Lock()

        def writer(n: int) -> None:
            server = (a, b)[n % 2]
            with requests.Session() as session:
                for i in range(12):
                    image_id = f"same-{i % 3}"
                    if (i + n) % 5 == 4:
                        r = session.delete(f"{server.url}/images/{image_id}", headers=AUTH)
                    else:
                        kind = list(bodies)[(i + n) % 3]
                        r = session.post(
                            server.url + "/images",
                            headers=AUTH,
                            files={"file": ("x", bodies[kind])},
                            data={"id": image_id},
                        )
                    with lock:
                        statuses[r.status_code] += 1

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert set(statuses) <= {200, 201, 404}, (statuses, log.read_text()[-2000:])
    assert statuses[201] > 0
    states = check_catalogue(db_location, images)
    assert "seed" in states


def test_a_later_full_extract_of_the_api_folder_keeps_every_api_change(tmp_path, model):
    """IMAGEFINDER_IMAGES_DIR is the folder extract reads: the API's files are the folder's,
    so a later extract finds its additions and replacements unchanged and does not bring
    back what it deleted."""
    from fastapi.testclient import TestClient

    from imagefinder.config import Settings
    from imagefinder.server.app import create_app
    from imagefinder.service import Service

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.jpg").write_bytes(photo(i))
    store = open_store(tmp_path / "index.db")
    index_folder(folder, store, model)
    settings = Settings(db=str(tmp_path / "index.db"), images_dir=str(folder), api_token=TOKEN)
    service = Service(settings)
    service.embedder = model
    with TestClient(create_app(service=service)) as client:
        png = image_bytes((30, 30), (1, 2, 3), fmt="PNG")
        for image_id in ("p0", "added"):  # replace one (as PNG), add one
            r = client.post(
                "/images", files={"file": ("x", png)}, data={"id": image_id}, headers=AUTH
            )
            assert r.status_code == 201, r.text
        assert client.delete("/images/p1", headers=AUTH).status_code == 200
    service.close()
    summary = index_folder(folder, store, model, prune=True)
    assert (summary.indexed, summary.pruned) == (0, 0), summary
    assert sorted(store.file_states()) == ["added", "p0", "p2"]
    assert store.file_state("p0").sha256 == sha(png)
    store.close()


def test_a_later_full_extract_of_another_folder_wins_for_the_ids_it_holds(tmp_path, model):
    """The API writes elsewhere (IMAGEFINDER_IMAGES_DIR is not the extracted folder): a
    later extract makes the index match the folder for the ids the folder holds. An API
    replacement of such an id is replaced back; an API delete of one is undone while its
    file is still there. Ids only the API knows are left alone."""
    from imagefinder.config import Settings
    from imagefinder.indexes import Indexes
    from imagefinder.server.writes import add_image, remove_image
    from imagefinder.service import Service

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.jpg").write_bytes(photo(i))
    store = open_store(tmp_path / "index.db")
    index_folder(folder, store, model)
    settings = Settings(db=str(tmp_path / "index.db"), images_dir=str(tmp_path / "api"))
    service = Service(settings)
    service.embedder = model
    indexes = Indexes(settings, [service])
    add_image(indexes, "p0", image_bytes((30, 30), (1, 2, 3), fmt="PNG"))
    add_image(indexes, "api-only", image_bytes((30, 30), (9, 9, 9), fmt="PNG"))
    remove_image(indexes, "p1")
    assert (folder / "p1.jpg").exists()  # a folder indexed in place: its files stay
    service.close()

    summary = index_folder(folder, store, model, prune=True)
    assert summary.indexed == 2
    assert store.file_state("p0").path == str((folder / "p0.jpg").resolve())
    assert store.file_state("p1").path == str((folder / "p1.jpg").resolve())
    assert store.file_state("api-only").path == str((tmp_path / "api" / "api-only.png").resolve())
    store.close()
