"""MovieLens releases: the real ml-100k, and every other release's format written out here.

The formats below are written from GroupLens' README files, not from engine.releases, so a
loader that misreads a format disagrees with these writers.
"""

import csv
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InputError
from engine.movielens import load_ratings as load_u_data
from engine.releases import (
    RELEASE_FOLDERS, RELEASES, download_release, find_release, load_release, read_ratings,
    release_url,
)
from tests.conftest import write_movielens

WHOLE_STARS = [1.0, 2.0, 3.0, 4.0, 5.0]
HALF_STARS = [0.5 * k for k in range(1, 11)]

# release -> (folder its archive unpacks to, file family, titles encoding, rating scale)
FORMATS = {
    "ml-1m": ("ml-1m", "dat", "latin-1", WHOLE_STARS),
    "ml-10m": ("ml-10M100K", "dat", "utf-8", HALF_STARS),
    "ml-20m": ("ml-20m", "csv", "utf-8", HALF_STARS),
    "ml-25m": ("ml-25m", "csv", "utf-8", HALF_STARS),
    "ml-32m": ("ml-32m", "csv", "utf-8", HALF_STARS),
    "ml-latest": ("ml-latest", "csv", "utf-8", HALF_STARS),
    "ml-latest-small": ("ml-latest-small", "csv", "utf-8", HALF_STARS),
}

TITLES = {
    1: "Toy Story (1995)",
    2: "American President, The (1995)",  # a comma: quoted in movies.csv
    3: "Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb (1964)",  # colons
    4: "Café au lait (Métisse) (1993)",  # latin-1 in ml-1m, utf-8 later
    5: 'Big "Quoted" Movie, A (2000)',  # quotes and a comma: doubled quotes in movies.csv
    7: "Shawshank Redemption, The (1994)",
}
UTF8_ONLY_TITLE = (6, "Ōkami (2009)")  # not in latin-1: only the utf-8 releases carry it


def make_rows(stars, n_users=12, n_movies=7, seed=0):
    """(user, movie, rating, timestamp) tuples in no particular order, ids from 1."""
    rng = np.random.default_rng(seed)
    rows = [
        (user, movie, float(rng.choice(stars)), int(rng.integers(789_652_009, 1_700_000_000)))
        for user in range(1, n_users + 1)
        for movie in range(1, n_movies + 1)
        if rng.random() < 0.7
    ]
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def titles_for(encoding):
    titles = dict(TITLES)
    if encoding == "utf-8":
        titles[UTF8_ONLY_TITLE[0]] = UTF8_ONLY_TITLE[1]
    return titles


def dat_rating_line(user, movie, rating, timestamp):
    return f"{user}::{movie}::{rating:g}::{timestamp}"  # ml-1m and ml-10m write 5, 3.5


def csv_rating_line(user, movie, rating, timestamp):
    return f"{user},{movie},{rating:.1f},{timestamp}"  # ml-20m onwards write 5.0, 3.5


def write_release(root, name, rows, titles=None, rating_lines=None):
    """A release folder under ``root`` in the exact format of ``name``; returns the folder."""
    folder_name, family, encoding, _ = FORMATS[name]
    folder = Path(root) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    titles = titles_for(encoding) if titles is None else titles

    if family == "dat":
        lines = rating_lines or [dat_rating_line(*row) for row in rows]
        (folder / "ratings.dat").write_text("\n".join(lines) + "\n", encoding="ascii")
        movies = [f"{movie}::{title}::Comedy|Drama" for movie, title in titles.items()]
        (folder / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode(encoding))
    else:
        lines = rating_lines or [csv_rating_line(*row) for row in rows]
        text = "userId,movieId,rating,timestamp\n" + "\n".join(lines) + "\n"
        (folder / "ratings.csv").write_text(text, encoding="ascii")
        with open(folder / "movies.csv", "w", encoding="utf-8", newline="") as movies:
            writer = csv.writer(movies, lineterminator="\n")
            writer.writerow(["movieId", "title", "genres"])
            for movie, title in titles.items():
                writer.writerow([movie, title, "Comedy|Drama"])
    return folder


def as_tuples(ratings):
    return [
        (int(u), int(m), float(r), int(t))
        for u, m, r, t in ratings[["user", "movie", "rating", "timestamp"]].to_numpy(object)
    ]


# ---------------------------------------------------------------------------------------------
# the real MovieLens 100K


def test_ml100k_counts_are_the_readmes(ml100k):
    # README: "100,000 ratings (1-5) from 943 users on 1682 movies"
    data = load_release(ml100k)

    assert data.name == "ml-100k"
    assert len(data.ratings) == 100_000
    assert data.ratings["user"].nunique() == 943
    assert data.ratings["movie"].nunique() == 1682
    assert len(data.titles) == 1682
    assert sorted(data.ratings["rating"].unique().tolist()) == WHOLE_STARS
    assert data.ratings.dtypes.astype(str).to_dict() == {
        "user": "int64", "movie": "int64", "rating": "float32", "timestamp": "int64",
    }


def test_ml100k_rows_match_a_plain_reading_of_the_file(ml100k):
    with open(Path(ml100k) / "u.data") as lines:
        expected = np.array([line.split("\t") for line in lines], dtype=np.int64)

    data = load_release(ml100k)

    for column, name in enumerate(["user", "movie", "rating", "timestamp"]):
        np.testing.assert_array_equal(data.ratings[name].to_numpy(), expected[:, column])
    # and what the workbook builder's own loader reads, a different parser
    np.testing.assert_array_equal(data.ratings.to_numpy(), load_u_data(ml100k).to_numpy())
    assert data.titles[1] == "Toy Story (1995)"  # u.item line 1


def test_ml100k_by_name_through_the_environment(ml100k):
    data = load_release(
        "ml-100k", environ={"XLMIRROR_DATA": str(Path(ml100k).parent)}, use_fastai=False
    )

    assert data.folder == Path(ml100k)
    assert len(data.ratings) == 100_000


def test_titles_column_keeps_the_file_order(ml100k):
    data = load_release(ml100k)

    with_titles = data.with_titles()

    assert list(with_titles.columns) == ["user", "movie", "rating", "timestamp", "title"]
    assert with_titles["title"].iloc[0] == "Kolya (1996)"  # u.data line 1 rates movie 242
    assert with_titles["title"].nunique() == 1664  # 1682 movies, 18 titles used twice
    assert with_titles["title"].notna().all()


# ---------------------------------------------------------------------------------------------
# every other format, written here


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_release_format_loads(tmp_path, name):
    rows = make_rows(FORMATS[name][3])
    folder = write_release(tmp_path, name, rows)

    data = load_release(folder)

    assert data.name == name
    assert data.folder == folder
    assert as_tuples(data.ratings) == rows
    assert data.titles == titles_for(FORMATS[name][2])
    assert data.ratings.dtypes.astype(str).tolist() == ["int64", "int64", "float32", "int64"]


def test_synthetic_ml100k_loads(tmp_path):
    folder = write_movielens(tmp_path / "ml-100k", n_users=9, n_movies=6, seed=3,
                             titles={2: "Café (1996)"})
    with open(folder / "u.data") as lines:
        expected = [tuple(int(field) for field in line.split("\t")) for line in lines]

    data = load_release(folder)

    assert data.name == "ml-100k"
    assert as_tuples(data.ratings) == [(u, m, float(r), t) for u, m, r, t in expected]
    assert data.titles[2] == "Café (1996)"


def test_half_stars_survive_as_float32(tmp_path):
    rows = [(1, 1, stars, 1_000_000_000) for stars in HALF_STARS]
    folder = write_release(tmp_path, "ml-25m", rows)

    ratings = load_release(folder).ratings["rating"].to_numpy()

    assert ratings.dtype == np.float32
    np.testing.assert_array_equal(ratings, np.arange(1, 11, dtype=np.float32) / 2)


def test_a_renamed_folder_needs_the_release_name(tmp_path):
    folder = write_release(tmp_path, "ml-1m", make_rows(WHOLE_STARS))
    renamed = folder.rename(tmp_path / "my ratings")

    with pytest.raises(InputError, match=r"cannot tell which .* ml-1m, ml-10m"):
        load_release(renamed)
    assert load_release(renamed, name="ml-1m").titles[4] == TITLES[4]


def test_a_folder_holding_one_release_is_enough(tmp_path):
    write_release(tmp_path / "data", "ml-10m", make_rows(HALF_STARS))

    data = load_release(tmp_path / "data")

    assert data.name == "ml-10m"
    assert data.folder == tmp_path / "data" / "ml-10M100K"


def test_a_folder_holding_two_releases_is_ambiguous(tmp_path):
    write_release(tmp_path, "ml-10m", make_rows(HALF_STARS))
    write_release(tmp_path, "ml-25m", make_rows(HALF_STARS))

    with pytest.raises(InputError, match="several MovieLens releases"):
        load_release(tmp_path)
    assert load_release(tmp_path, name="ml-25m").name == "ml-25m"


def test_fastais_sample_has_no_titles(tmp_path):
    folder = tmp_path / "movie_lens_sample"
    folder.mkdir()
    rows = make_rows(HALF_STARS)
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "\n".join(csv_rating_line(*r) for r in rows) + "\n"
    )

    data = load_release(folder)

    assert data.name == "ml-sample"
    assert data.titles == {}
    assert as_tuples(data.ratings) == rows


def test_a_large_file_loads_whole_and_a_late_bad_line_is_found(tmp_path):
    # 300k rows span many of the C parser's buffers; a blank line every 10,000 rows makes
    # row and line numbers drift apart, so a miscount would name the wrong line
    rng = np.random.default_rng(7)
    n_rows = 300_000
    users = rng.integers(1, 5000, n_rows)
    stars = rng.integers(1, 11, n_rows) / 2
    lines = []
    for row in range(n_rows):
        lines.append(f"{users[row]},{row % 977 + 1},{stars[row]:.1f},{1_000_000_000 + row}")
        if row % 10_000 == 9_999:
            lines.append("")
    folder = write_release(tmp_path, "ml-32m", [], rating_lines=lines)

    ratings = load_release(folder).ratings

    assert len(ratings) == n_rows
    np.testing.assert_array_equal(ratings["user"].to_numpy(), users)
    np.testing.assert_array_equal(ratings["rating"].to_numpy(), stars.astype(np.float32))

    # line 1 is the header; data row 250,000 (0-based) follows 25 blank lines
    bad_row = 250_000
    bad_index = bad_row + bad_row // 10_000
    for bad_value, words in (("7.0", "outside"), ("seven", "not a number")):
        changed = list(lines)
        changed[bad_index] = f"42,1,{bad_value},1000000000"
        write_release(tmp_path, "ml-32m", [], rating_lines=changed)
        with pytest.raises(InputError, match=rf"ratings.csv line {bad_index + 2}: .*{words}"):
            load_release(folder)


# ---------------------------------------------------------------------------------------------
# bad files: each error names the file, the line and shows it

GOOD_ROWS = [(1, 1, 4.0, 881250949), (1, 2, 3.0, 881250950), (2, 1, 5.0, 881250951),
             (3, 2, 1.0, 881250952), (3, 1, 2.0, 881250953)]


def lines_with(name, line_number, text):
    """The GOOD_ROWS lines of ``name`` with file line ``line_number`` replaced by ``text``."""
    family = FORMATS[name][1] if name in FORMATS else "tab"
    if family == "dat":
        lines = [dat_rating_line(*row) for row in GOOD_ROWS]
    elif family == "csv":
        lines = [csv_rating_line(*row) for row in GOOD_ROWS]
    else:
        lines = ["\t".join(str(int(v)) for v in row) for row in GOOD_ROWS]
    index = line_number - 1 - (family == "csv")  # the csv header is line 1
    lines[index] = text
    return lines


def write_with(tmp_path, name, lines):
    if name == "ml-100k":
        folder = write_movielens(tmp_path / "ml-100k")
        (folder / "u.data").write_text("\n".join(lines) + "\n")
        return folder
    return write_release(tmp_path, name, [], rating_lines=lines)


BAD_LINES = [
    # release, file line, the line written there, words the message must hold
    ("ml-100k", 3, "1\t5\tthree\t881250949", "rating 'three' is not a number"),
    ("ml-100k", 2, "1\t5\t6\t881250949", "rating 6 is outside 1..5"),
    ("ml-100k", 4, "1,5,3,881250949", "found 1 field"),
    ("ml-100k", 5, "0\t5\t3\t881250949", "user id '0' is not a positive whole number"),
    ("ml-1m", 1, "1\t1\t4\t881250949", "found 1 field(s) separated by '::'"),
    ("ml-1m", 3, "2::1::x::881250951", "rating 'x' is not a number"),
    ("ml-1m", 4, "3::2::3.5::881250952", "rating 3.5 is not a multiple of 1"),
    ("ml-1m", 2, "1::2::::881250950", "rating is missing"),
    ("ml-10m", 5, "3::1::4.25::881250953", "rating 4.25 is not a multiple of 0.5"),
    ("ml-10m", 2, "1::2::3.5:881250950", "found 3 field"),
    ("ml-10m", 3, "2:9:1::5::881250951", "found 3 field"),  # parses, but a gap is not empty
    ("ml-10m", 4, "3::2.5::3::881250952", "movie id '2.5' is not a positive whole number"),
    ("ml-25m", 3, "1,2,nan,881250950", "rating is missing"),
    ("ml-25m", 4, "2,1,,881250951", "rating is missing"),
    ("ml-25m", 5, "3,2,5.5,881250952", "rating 5.5 is outside 0.5..5"),
    ("ml-25m", 6, "3,1,0.0,881250953", "rating 0 is outside 0.5..5"),
    ("ml-25m", 2, "1;1;4.0;881250949", "found 1 field"),
    ("ml-20m", 6, "3\t1\t2.0\t881250953", "found 1 field"),
    ("ml-latest-small", 4, "2,1,5.0", "found 3 field"),
    ("ml-latest", 3, "1,2,3.0,soon", "timestamp 'soon' is not a whole number"),
    ("ml-32m", 5, "3,2,1.0,881250952,extra", "found 5 field"),
]


@pytest.mark.parametrize("name, line, text, words", BAD_LINES)
def test_a_bad_line_is_named_and_shown(tmp_path, name, line, text, words):
    folder = write_with(tmp_path, name, lines_with(name, line, text))
    file_name = RELEASES[name].ratings_file

    with pytest.raises(InputError) as error:
        load_release(folder)

    message = str(error.value)
    assert f"{folder / file_name} line {line}: " in message
    assert words in message, message
    assert repr(text) in message


def test_blank_lines_are_skipped_and_counted(tmp_path):
    lines = [csv_rating_line(*row) for row in GOOD_ROWS]
    lines[1:1] = ["", "   "]  # file lines 3 and 4
    folder = write_release(tmp_path, "ml-25m", [], rating_lines=lines)

    assert as_tuples(load_release(folder).ratings) == GOOD_ROWS

    lines[4] = "3,2,9.0,881250952"  # after the header and the two blank lines: file line 6
    write_release(tmp_path, "ml-25m", [], rating_lines=lines)
    with pytest.raises(InputError, match="ratings.csv line 6: the rating 9 is outside"):
        load_release(folder)


WRONG_HEADERS = ["user,item,rating,timestamp", "userId;movieId;rating;timestamp", "1,1,4.0,88125"]


@pytest.mark.parametrize("header", WRONG_HEADERS)
def test_a_wrong_header_is_line_1(tmp_path, header):
    folder = write_release(tmp_path, "ml-25m", GOOD_ROWS)
    text = (folder / "ratings.csv").read_text().split("\n", 1)[1]
    (folder / "ratings.csv").write_text(header + "\n" + text)

    with pytest.raises(InputError, match=r"ratings.csv line 1: expected the header "
                                         r"'userId,movieId,rating,timestamp', got '"):
        load_release(folder)


def test_an_empty_ratings_file(tmp_path):
    folder = write_release(tmp_path, "ml-1m", GOOD_ROWS)
    (folder / "ratings.dat").write_text("")

    with pytest.raises(InputError, match="ratings.dat .*holds no ratings"):
        load_release(folder)

    header_only = write_release(tmp_path, "ml-20m", GOOD_ROWS)
    (header_only / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(InputError, match="ratings.csv holds no ratings"):
        load_release(header_only)


def test_missing_files(tmp_path):
    folder = write_release(tmp_path, "ml-25m", GOOD_ROWS)
    (folder / "movies.csv").unlink()
    with pytest.raises(InputError, match=r"movies.csv does not exist"):
        load_release(folder)

    with pytest.raises(InputError, match=r"ratings.dat does not exist; pass the folder"):
        read_ratings(tmp_path / "nowhere" / "ratings.dat", "ml-1m")

    (folder / "ratings.csv").unlink()
    with pytest.raises(InputError, match=r"no ratings.csv in .*ml-25m"):
        load_release(folder, name="ml-25m")


def test_bad_titles_files(tmp_path):
    unquoted = write_release(tmp_path / "a", "ml-25m", GOOD_ROWS)
    with open(unquoted / "movies.csv", "a") as movies:
        movies.write("9,Usual Suspects, The (1995),Crime\n")
    with pytest.raises(InputError, match=r"movies.csv line 9: expected movieId,title,genres"):
        load_release(unquoted)

    latin1 = write_release(tmp_path / "b", "ml-10m", GOOD_ROWS)
    with open(latin1 / "movies.dat", "ab") as movies:
        movies.write("9::Café (1994)::Drama\n".encode("latin-1"))  # ml-10m is utf-8
    with pytest.raises(InputError, match=r"movies.dat line 8: byte 0xe9 is not utf-8"):
        load_release(latin1)

    no_title = write_release(tmp_path / "c", "ml-1m", GOOD_ROWS)
    with open(no_title / "movies.dat", "a", encoding="latin-1") as movies:
        movies.write("9::Drama\n")
    with pytest.raises(InputError, match=r"movies.dat line 7: expected MovieID::Title::Genres"):
        load_release(no_title)


def test_unknown_names(tmp_path):
    with pytest.raises(InputError, match="unknown MovieLens release 'ml-5m'.*ml-25m"):
        find_release("ml-5m")
    with pytest.raises(InputError, match="neither a folder nor a MovieLens release"):
        load_release(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="holds no MovieLens ratings"):
        load_release(tmp_path)


# ---------------------------------------------------------------------------------------------
# finding and downloading


def test_release_folders():
    assert RELEASE_FOLDERS["ml-10m"] == "ml-10M100K"
    assert {name: RELEASE_FOLDERS[name] for name in FORMATS} == {
        name: spec[0] for name, spec in FORMATS.items()
    }
    assert set(RELEASES) == set(FORMATS) | {"ml-100k", "ml-sample"}


def test_find_release_in_every_place(tmp_path, monkeypatch):
    folder = write_release(tmp_path / "mine", "ml-10m", GOOD_ROWS)
    fastai_data = tmp_path / "fastai"
    # fastai's untar_data renames the unpacked folder after the archive
    write_release(tmp_path / "unpacked", "ml-10m", GOOD_ROWS).rename(
        tmp_path / "unpacked" / "ml-10m")
    (tmp_path / "unpacked").rename(fastai_data)
    monkeypatch.setattr("engine.releases.fastai_data_folder", lambda: fastai_data)

    assert find_release("ml-10m", explicit=folder) == folder
    assert find_release("ml-10m", explicit=folder.parent) == folder
    assert find_release("ml-10m", environ={"XLMIRROR_DATA": str(folder.parent)}) == folder
    assert find_release("ml-10m", environ={}) == fastai_data / "ml-10m"
    assert find_release("ml-10m", environ={}, use_fastai=False) is None
    assert find_release("ml-25m", environ={"XLMIRROR_DATA": str(folder.parent)}) is None
    with pytest.raises(InputError, match=r"no ratings.csv in .*point --data at the ml-25m folder"):
        find_release("ml-25m", explicit=folder)


@pytest.fixture
def fake_untar(tmp_path, monkeypatch):
    """fastai's untar_data, offline: records the URL and unpacks a written release."""
    import fastai.data.external

    asked = []

    def untar_data(url):
        asked.append(url)
        name = url.rsplit("/", 1)[1].removesuffix(".zip")
        folder = write_release(tmp_path / "downloads", name, GOOD_ROWS)
        return folder.rename(folder.with_name(name))  # as fastai renames it

    monkeypatch.setattr(fastai.data.external, "untar_data", untar_data)
    return asked


def test_download_asks_fastai_for_the_right_url(fake_untar):
    from fastai.data.external import URLs

    folder = download_release("ml-25m")

    assert fake_untar == ["https://files.grouplens.org/datasets/movielens/ml-25m.zip"]
    assert folder.name == "ml-25m"
    assert release_url("ml-100k") == URLs.ML_100k
    assert release_url("ml-sample") == URLs.ML_SAMPLE
    assert release_url("ml-10m") == "https://files.grouplens.org/datasets/movielens/ml-10m.zip"


def test_load_downloads_only_when_allowed(fake_untar):
    with pytest.raises(InputError, match="ml-10m was not found; .*XLMIRROR_DATA"):
        load_release("ml-10m", environ={}, use_fastai=False)
    assert fake_untar == []

    data = load_release("ml-10m", download=True, environ={}, use_fastai=False)

    assert fake_untar == ["https://files.grouplens.org/datasets/movielens/ml-10m.zip"]
    assert as_tuples(data.ratings) == GOOD_ROWS
    assert data.folder.name == "ml-10m"


def test_not_found_names_the_data_folder_already_set(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(InputError) as error:
        load_release("ml-10m", environ={"XLMIRROR_DATA": str(empty)}, use_fastai=False)
    expected = f"XLMIRROR_DATA to a folder holding ml-10M100K/ (it is {empty}, which holds none)"
    assert expected in str(error.value)


def test_offline_download_says_how_to_provide_the_data(monkeypatch):
    import fastai.data.external

    def offline(url):
        raise OSError(f"cannot reach {url}: network is unreachable")

    monkeypatch.setattr(fastai.data.external, "untar_data", offline)

    with pytest.raises(InputError) as error:
        download_release("ml-1m")

    message = str(error.value)
    assert "MovieLens ml-1m was not found and could not be downloaded" in message
    assert "https://files.grouplens.org/datasets/movielens/ml-1m.zip" in message
    assert "network is unreachable" in message
    assert "XLMIRROR_DATA to a folder holding ml-1m/" in message


def test_a_download_without_the_ratings_is_an_error(tmp_path, monkeypatch):
    import fastai.data.external

    empty = tmp_path / "ml-20m"
    empty.mkdir()
    monkeypatch.setattr(fastai.data.external, "untar_data", lambda url: empty)

    with pytest.raises(InputError, match="unpacked to .*ml-20m, which holds no ratings.csv"):
        download_release("ml-20m")
