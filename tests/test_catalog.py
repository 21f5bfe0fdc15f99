"""The catalogue CSV: a ``url,id`` header, safe ids, http(s) urls, one-line errors."""

from __future__ import annotations

import pytest

from imagefinder.catalog import CatalogError, id_problem, parse_catalog, read_catalog, url_problem


def test_rows_keep_their_line_numbers():
    rows = parse_catalog(b"url,id\nhttp://a.test/1.jpg,one\nhttps://a.test/2.png,two\n")
    assert [(r.line, r.url, r.id, r.problem) for r in rows] == [
        (2, "http://a.test/1.jpg", "one", None),
        (3, "https://a.test/2.png", "two", None),
    ]


def test_columns_are_found_by_name_in_any_order():
    rows = parse_catalog(b"ID, Url ,note\nx1,http://a.test/x.jpg,hello\n")
    assert (rows[0].id, rows[0].url, rows[0].problem) == ("x1", "http://a.test/x.jpg", None)


def test_bom_and_crlf_from_spreadsheets_are_accepted():
    data = "\ufeffurl,id\r\nhttp://a.test/1.jpg,one\r\nhttp://a.test/2.jpg,two\r\n".encode()
    rows = parse_catalog(data)
    assert [(r.url, r.id, r.problem) for r in rows] == [
        ("http://a.test/1.jpg", "one", None),
        ("http://a.test/2.jpg", "two", None),
    ]


def test_blank_lines_are_ignored_but_line_numbers_stay_true():
    rows = parse_catalog(b"url,id\n\nhttp://a.test/1.jpg,one\n,\n")
    assert [(r.line, r.id) for r in rows] == [(3, "one")]


@pytest.mark.parametrize(
    "header, missing",
    [(b"link,name\n", "url, id"), (b"url\n", "id"), (b"id;url\n", "url, id")],
)
def test_a_header_without_url_and_id_is_one_error_naming_line_1(header, missing):
    with pytest.raises(CatalogError) as e:
        parse_catalog(header + b"http://a.test/1.jpg,one\n", name="cat.csv")
    message = str(e.value)
    assert message.startswith("cat.csv:1: ")
    assert f"missing column(s) {missing}" in message
    assert "\n" not in message


def test_an_empty_file_is_an_error():
    with pytest.raises(CatalogError, match="empty file; expected a header line 'url,id'"):
        parse_catalog(b"", name="cat.csv")


def test_a_file_that_is_not_utf8_text_is_an_error():
    with pytest.raises(CatalogError, match="not UTF-8"):
        parse_catalog(b"url,id\nhttp://a.test/\xff.jpg,x\n")
    # NULs in the header: UTF-16 or a binary file, so the whole file is refused.
    with pytest.raises(CatalogError, match=r"cat.csv:1: contains NUL bytes"):
        parse_catalog("url,id\nhttp://a.test/1.jpg,one\n".encode("utf-16-le"), name="cat.csv")


def test_control_characters_in_a_row_refuse_only_that_row():
    rows = parse_catalog(b"url,id\nhttp://a.test/\x00.jpg,one\nhttp://a.test/2.jpg,two\n")
    assert "control character" in rows[0].problem
    assert rows[1].problem is None


def test_an_unreadable_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(CatalogError, match="nope.csv: cannot read"):
        read_catalog(tmp_path / "nope.csv")


def test_duplicate_ids_are_refused_naming_the_first_line():
    rows = parse_catalog(
        b"url,id\nhttp://a.test/1.jpg,a\nhttp://a.test/2.jpg,b\nhttp://a.test/3.jpg,a\n"
    )
    assert [r.problem for r in rows[:2]] == [None, None]
    assert rows[2].line == 4
    assert rows[2].problem == "duplicate id 'a' (first on line 2)"


def test_a_short_row_is_refused_not_fatal():
    rows = parse_catalog(b"url,id\nhttp://a.test/1.jpg\nhttp://a.test/2.jpg,two\n")
    assert rows[0].problem == "expected 2 columns, got 1"
    assert rows[1].problem is None


@pytest.mark.parametrize(
    "image_id",
    [
        "../etc/passwd",
        "a/b",
        "a\\b",
        ".hidden",
        "-rf",
        "with space",
        "x" * 129,
        "",
        "caf\u00e9",
        "a:b",
    ],
)
def test_ids_that_are_unsafe_as_file_names_are_refused(image_id):
    assert id_problem(image_id) is not None
    line = f"url,id\nhttp://a.test/1.jpg,{image_id}\n".encode()
    (row,) = parse_catalog(line)
    assert row.problem is not None


@pytest.mark.parametrize("image_id", ["a", "A_1", "img-0001", "photo.2024.v2", "_x", "9" * 128])
def test_ordinary_ids_are_accepted(image_id):
    assert id_problem(image_id) is None


@pytest.mark.parametrize(
    "url, problem",
    [
        ("ftp://a.test/x.jpg", "unsupported url scheme 'ftp'"),
        ("file:///etc/passwd", "unsupported url scheme 'file'"),
        ("javascript:alert(1)", "unsupported url scheme 'javascript'"),
        ("a.test/x.jpg", "unsupported url scheme '(none)'"),
        ("http:///x.jpg", "url has no host"),
        ("", "empty url"),
    ],
)
def test_only_http_and_https_urls_are_downloadable(url, problem):
    assert problem in url_problem(url)


@pytest.mark.parametrize(
    "url", ["http://a.test/x.jpg", "HTTPS://a.test/x?y=1", "http://127.0.0.1:8080/a"]
)
def test_http_and_https_urls_are_accepted(url):
    assert url_problem(url) is None


def test_the_real_catalogue_parses(caltech_dir):
    path = caltech_dir.parent / "lydia-images.csv"
    rows = read_catalog(path)
    assert len(rows) == 295
    assert all(r.problem is None for r in rows), [r for r in rows if r.problem][:3]
    assert len({r.id for r in rows}) == len(rows)
