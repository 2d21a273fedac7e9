"""Every MovieLens release in its own file format: find it, download it, load and validate it.

GroupLens has published its ratings in three layouts over the years:

- ``ml-100k``: ``u.data``, tab separated ``user movie rating timestamp`` without a header, and
  ``u.item``, pipe separated latin-1 with the title second.
- ``ml-1m`` and ``ml-10m``: ``ratings.dat``, ``UserID::MovieID::Rating::Timestamp``, and
  ``movies.dat``, ``MovieID::Title::Genres`` (latin-1 in ml-1m, utf-8 in ml-10m, whose archive
  unpacks to ``ml-10M100K``).
- ``ml-20m`` onwards: ``ratings.csv`` with the header ``userId,movieId,rating,timestamp`` and
  ``movies.csv`` with ``movieId,title,genres``, utf-8, titles holding a comma quoted.

Whatever the layout, ``load_release`` returns the ratings as one DataFrame with the columns
``user`` (int64), ``movie`` (int64), ``rating`` (float32) and ``timestamp`` (int64, seconds
since 1970), in file order. Every line is validated; an error names the file, the 1-based line
number and shows the line.
"""

import csv
import io
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from engine.errors import InputError
from engine.movielens import DATA_ENV, fastai_data_folder, load_titles

logger = logging.getLogger("xlmirror")

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/{name}.zip"
RATING_COLUMNS = ("user", "movie", "rating", "timestamp")


@dataclass(frozen=True)
class Layout:
    """How one generation of MovieLens writes its ratings file."""

    separator: str
    header: str | None  # the exact first line, or None for files without one
    shape: str  # a line as the user should see it, for error messages


LAYOUTS = {
    "tab": Layout("\t", None, "user<TAB>movie<TAB>rating<TAB>timestamp"),
    "colons": Layout("::", None, "UserID::MovieID::Rating::Timestamp"),
    "csv": Layout(",", "userId,movieId,rating,timestamp", "userId,movieId,rating,timestamp"),
}
MOVIES_CSV_HEADER = "movieId,title,genres"


@dataclass(frozen=True)
class Release:
    """One MovieLens release: where its archive unpacks, its files and its rating scale."""

    name: str  # the archive's name at GroupLens (ml-25m.zip)
    folder: str  # the folder the archive unpacks to
    layout: str  # a key of LAYOUTS
    ratings_file: str
    titles_file: str | None  # None: the release ships no titles
    encoding: str  # of the titles file; the ratings files are ASCII in every release
    min_rating: float
    rating_step: float  # 1.0: whole stars, 0.5: half stars
    max_rating: float = 5.0
    fastai_url: str | None = None  # the name of fastai's ``URLs`` constant, where it has one

    @property
    def stars(self):
        """The rating scale in words, for messages."""
        kind = "whole" if self.rating_step == 1 else "half"
        return f"{self.min_rating:g}..{self.max_rating:g} in {kind} stars"


WHOLE_STARS = {"min_rating": 1.0, "rating_step": 1.0}
HALF_STARS = {"min_rating": 0.5, "rating_step": 0.5}


def _csv_release(name):
    return Release(name, name, "csv", "ratings.csv", "movies.csv", "utf-8", **HALF_STARS)


RELEASES = {
    release.name: release
    for release in (
        Release("ml-100k", "ml-100k", "tab", "u.data", "u.item", "latin-1", **WHOLE_STARS,
                fastai_url="ML_100k"),
        Release("ml-1m", "ml-1m", "colons", "ratings.dat", "movies.dat", "latin-1",
                **WHOLE_STARS),
        Release("ml-10m", "ml-10M100K", "colons", "ratings.dat", "movies.dat", "utf-8",
                **HALF_STARS),
        _csv_release("ml-20m"),
        _csv_release("ml-25m"),
        _csv_release("ml-32m"),
        _csv_release("ml-latest"),
        _csv_release("ml-latest-small"),
        # fastai's own sample of the ratings (no titles), the one its collab docs train on
        Release("ml-sample", "movie_lens_sample", "csv", "ratings.csv", None, "utf-8",
                **HALF_STARS, fastai_url="ML_SAMPLE"),
    )
}
RELEASE_FOLDERS = {name: release.folder for name, release in RELEASES.items()}


@dataclass
class MovieLensData:
    """One release loaded: ratings in file order and the titles of its movies."""

    name: str
    folder: Path
    ratings: pd.DataFrame  # (n_ratings, 4): user, movie, rating, timestamp
    titles: dict  # movie id -> title; empty for a release without titles

    def with_titles(self):
        """The ratings with a ``title`` column (NaN for a movie without one), in file order.

        This is fastbook's ``ratings.merge(movies)``, done with a lookup so that the row order
        (which a random split depends on) cannot change.
        """
        return self.ratings.assign(title=self.ratings["movie"].map(self.titles))


def get_release(name):
    """The ``Release`` called ``name``; an unknown name is an InputError listing the known."""
    try:
        return RELEASES[name]
    except (KeyError, TypeError):
        raise InputError(
            f"unknown MovieLens release {name!r}: choose one of {', '.join(RELEASES)}"
        ) from None


def release_url(name):
    """Where ``name`` is downloaded from: fastai's ``URLs`` constant, else GroupLens."""
    release = get_release(name)
    if release.fastai_url is not None:
        from fastai.data.external import URLs  # imports torch: only when really needed

        return getattr(URLs, release.fastai_url)
    return GROUPLENS_URL.format(name=release.name)


def how_to_provide(release, environ=None):
    """The ways a user can make ``release`` available, for the end of an error message.

    When ``XLMIRROR_DATA`` is set (in ``environ``, default ``os.environ``) to a folder without
    the release, the message says so, since the user may believe it is already provided.
    """
    environ = os.environ if environ is None else environ
    current = environ.get(DATA_ENV)
    data_env = f"set {DATA_ENV} to a folder holding {release.folder}/"
    if current and _release_in(current, release) is None:
        data_env += f" (it is {current}, which holds none)"
    return (
        f"pass the folder holding {release.ratings_file} (or one holding {release.folder}/), "
        f"{data_env}, or allow fastai to download it"
    )


def _release_in(folder, release):
    """The folder at or directly inside ``folder`` that holds ``release``'s ratings, or None.

    fastai's ``untar_data`` renames the folder an archive unpacks to after the archive
    (``ml-10M100K`` becomes ``ml-10m``), so both names are looked for.
    """
    folder = Path(folder).expanduser()
    for candidate in (folder, folder / release.folder, folder / release.name):
        if (candidate / release.ratings_file).is_file():
            return candidate
    return None


def find_release(name, explicit=None, environ=None, use_fastai=True, option="--data"):
    """Locate the release ``name``; returns the folder holding its ratings file, or None.

    Parameters
    ----------
    name : str
        A key of ``RELEASES``, such as ``"ml-25m"``.
    explicit : path-like, optional
        The release folder itself, or a folder holding it. Looked at first; a folder without
        the release is an error rather than a reason to look elsewhere, since the user asked
        for that folder.
    environ : mapping, optional
        Where ``XLMIRROR_DATA`` is read from (default ``os.environ``); it names a folder that
        holds the release's folder.
    use_fastai : bool
        Whether to look in fastai's data folder (``~/.fastai/data`` unless configured) last.
    option : str
        The command-line option that supplied ``explicit``, named in the error message.
    """
    release = get_release(name)
    if explicit is not None:
        found = _release_in(explicit, release)
        if found is None:
            raise InputError(
                f"no {release.ratings_file} in {explicit} or {Path(explicit) / release.folder}: "
                f"point {option} at the {release.name} folder"
            )
        return found

    environ = os.environ if environ is None else environ
    if environ.get(DATA_ENV):
        found = _release_in(environ[DATA_ENV], release)
        if found is not None:
            return found
        logger.warning("%s=%s holds no %s/ folder; looking further", DATA_ENV,
                       environ[DATA_ENV], release.folder)

    if use_fastai:
        return _release_in(fastai_data_folder(), release)
    return None


def download_release(name):
    """Download and unpack ``name`` with fastai's ``untar_data``; returns the release folder.

    fastai keeps the archive and the unpacked folder in its data folder, so a second call
    finds them there instead of downloading again.
    """
    release = get_release(name)
    url = release_url(name)
    logger.info("downloading MovieLens %s from %s with fastai", release.name, url)
    try:
        from fastai.data.external import untar_data

        unpacked = Path(untar_data(url))
    except Exception as exc:  # no network, a proxy, a full disk: all end the same way for a user
        raise InputError(
            f"MovieLens {release.name} was not found and could not be downloaded from {url} "
            f"({exc.__class__.__name__}: {exc}); {how_to_provide(release)}"
        ) from None

    found = _release_in(unpacked, release)
    if found is None:
        raise InputError(
            f"the download of MovieLens {release.name} unpacked to {unpacked}, which holds no "
            f"{release.ratings_file}; delete it so that it is downloaded again, or "
            f"{how_to_provide(release)}"
        )
    return found


def load_release(folder_or_name, name=None, download=False, environ=None, use_fastai=True):
    """Load a MovieLens release and validate every line of it.

    Parameters
    ----------
    folder_or_name : path-like or str
        An existing folder (the release folder, or one holding it), or a release name that is
        looked for with ``find_release``.
    name : str, optional
        The release a folder holds. Without it the release is told by the folder's name
        (``ml-25m``, ``ml-10M100K``) or, for ``u.data``, by its files.
    download : bool
        Whether a release found nowhere is downloaded with fastai.
    environ, use_fastai
        As for ``find_release``.

    Returns
    -------
    MovieLensData
        ``ratings`` has one row per line of the ratings file, in file order.
    """
    release, folder = _resolve(folder_or_name, name, download, environ, use_fastai)

    ratings = read_ratings(folder / release.ratings_file, release)
    titles = read_titles(folder, release)
    return MovieLensData(release.name, folder, ratings, titles)


def _resolve(folder_or_name, name, download, environ, use_fastai):
    """The release and the folder holding it, for ``load_release``'s arguments."""
    candidate = Path(folder_or_name).expanduser()
    if candidate.is_dir():
        release = get_release(name) if name is not None else _identify(candidate)
        return release, find_release(release.name, explicit=candidate)

    if folder_or_name not in RELEASES:
        raise InputError(
            f"{folder_or_name!r} is neither a folder nor a MovieLens release: pass a folder "
            f"or one of {', '.join(RELEASES)}"
        )
    if name is not None and name != folder_or_name:
        raise InputError(f"asked for release {folder_or_name!r} under the name {name!r}")

    release = RELEASES[folder_or_name]
    folder = find_release(release.name, environ=environ, use_fastai=use_fastai)
    if folder is None:
        if not download:
            raise InputError(
                f"MovieLens {release.name} was not found; {how_to_provide(release, environ)}"
            )
        folder = download_release(release.name)
    return release, folder


def _identify(folder):
    """The release ``folder`` holds, told by its name, the one release inside, or its files."""
    by_name = [r for r in RELEASES.values() if folder.name in (r.name, r.folder)]
    if by_name:
        return by_name[0]

    inside = [r.name for r in RELEASES.values() if _release_in(folder, r) not in (None, folder)]
    if len(inside) == 1:
        return RELEASES[inside[0]]
    if inside:
        raise InputError(
            f"{folder} holds several MovieLens releases ({', '.join(inside)}): name the one to "
            f"load, or pass its own folder"
        )

    fits = [r.name for r in RELEASES.values() if (folder / r.ratings_file).is_file()]
    if len(fits) == 1:
        return RELEASES[fits[0]]
    if fits:
        raise InputError(
            f"cannot tell which MovieLens release {folder} holds: its files fit "
            f"{', '.join(fits)}; name the release, or give the folder its release's name"
        )
    raise InputError(
        f"{folder} holds no MovieLens ratings (u.data, ratings.dat or ratings.csv) and no "
        f"folder of a known release ({', '.join(RELEASE_FOLDERS.values())})"
    )


# ---------------------------------------------------------------------------------------------
# ratings


def read_ratings(path, release):
    """Read and validate one ratings file of ``release`` (a ``Release`` or its name).

    The whole file goes through pandas' C parser with fixed dtypes; only when that fails or a
    value is out of place is the file read again, line by line, to say where.

    Returns
    -------
    pandas.DataFrame
        Columns user (int64), movie (int64), rating (float32), timestamp (int64); a RangeIndex
        in file order. Blank lines are skipped.
    """
    release = get_release(release) if isinstance(release, str) else release
    layout = LAYOUTS[release.layout]
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist; {how_to_provide(release)}")
    if layout.header is not None:
        _check_header(path, layout.header)

    try:
        table = _parse_ratings(path, release.layout)
    except ValueError as exc:  # pandas' parse, dtype and empty-file errors are all ValueErrors
        _raise_first_bad_line(path, release)
        # every line checked out, so pandas' own words are the best left to show
        reason = "it holds no ratings" if isinstance(exc, pd.errors.EmptyDataError) else exc
        raise InputError(
            f"{path} is not a {release.name} ratings file ({reason}); expected lines like "
            f"{layout.shape}"
        ) from None

    if len(table) == 0:
        raise InputError(f"{path} holds no ratings; expected lines like {layout.shape}")
    bad_row = _first_bad_row(table, release)
    if bad_row is not None:
        _raise_first_problem(path, release, from_row=bad_row)
        # pandas saw a bad row that the line-by-line check passes: a bug here, not in the file
        raise RuntimeError(f"{path}: row {bad_row} failed the fast checks only")

    # float32 holds every whole and half star exactly; parsing as float64 and casting is
    # faster than asking the parser for float32 (measured: 0.53 s against 0.84 s for 5M rows)
    table["rating"] = table["rating"].astype(np.float32)
    return table[list(RATING_COLUMNS)]


def _parse_ratings(path, layout_name, chunksize=None):
    """The fast path: the file through pandas' C parser, no checks beyond dtypes.

    With ``chunksize``, an iterator of DataFrames of that many rows.
    """
    if layout_name == "colons":
        # a two-character separator would force pandas' python engine (about 40 times
        # slower); splitting on ':' keeps the C parser and leaves an empty column between
        # every two fields, which must stay empty (checked in _first_bad_row)
        names = ["user", "gap1", "movie", "gap2", "rating", "gap3", "timestamp"]
        separator = ":"
    else:
        names = list(RATING_COLUMNS)
        separator = LAYOUTS[layout_name].separator

    dtypes = {name: np.float64 for name in names}  # the gaps, and the rating (see the caller)
    dtypes.update(user=np.int64, movie=np.int64, timestamp=np.int64)
    # the files are ASCII; pandas' default utf-8 is its fast path (encoding="latin-1" took
    # 1.10 s instead of 0.40 s for 5M rows), and a stray byte fails here and is then shown
    # by the line-by-line reader
    return pd.read_csv(
        path, sep=separator, header=0 if layout_name == "csv" else None, names=names,
        dtype=dtypes, engine="c", chunksize=chunksize,
    )


def _first_bad_row(table, release):
    """The 0-based row of the first impossible value in a parsed table, or None."""
    rating = table["rating"].to_numpy()
    bad = np.isnan(rating) | (rating < release.min_rating) | (rating > release.max_rating)
    with np.errstate(invalid="ignore"):  # NaN ratings are already counted as bad
        bad |= np.mod(rating, release.rating_step) != 0  # exact: the steps are powers of two
    bad |= (table["user"].to_numpy() < 1) | (table["movie"].to_numpy() < 1)
    for gap in ("gap1", "gap2", "gap3"):
        if gap in table:
            bad |= ~np.isnan(table[gap].to_numpy())

    rows = np.flatnonzero(bad)
    return int(rows[0]) if len(rows) else None


def _check_header(path, expected):
    with open(path, "rb") as lines:
        first = lines.readline().decode("utf-8", errors="replace").lstrip("\ufeff").strip()
    if first != expected:
        shown = first[:120] if first else "an empty line"
        raise InputError(
            f"{path} line 1: expected the header {expected!r}, got {shown!r}; is this the "
            f"release's own file, written with commas?"
        )


CHUNK_ROWS = 200_000  # rows the search for a bad line parses at once in pandas


def _raise_first_bad_line(path, release):
    """Raise for the first line that is not a valid rating; returns if there is none.

    Runs after the fast reader failed. pandas reads the file again in chunks, each checked
    like the whole table is; only the first chunk that fails is checked line by line in
    Python (about 2.6 s per million lines; the whole of a 32M-row file would take minutes).
    """
    rows_before = 0
    try:
        for chunk in _parse_ratings(path, release.layout, chunksize=CHUNK_ROWS):
            bad_row = _first_bad_row(chunk, release)
            if bad_row is not None:
                rows_before += bad_row
                break
            rows_before += len(chunk)
    except ValueError:
        pass  # this chunk holds a line pandas cannot read: look at it line by line
    _raise_first_problem(path, release, from_row=rows_before)


def _data_lines(path, layout):
    """(line number, raw bytes) for each line pandas reads as a row: blank lines and the
    header are left out."""
    separator = layout.separator[0].encode()  # what pandas splits on (':' for '::')
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if number == 1 and layout.header is not None:
                continue
            # pandas skips a line of whitespace, unless it holds a separator ('\t' is both)
            if line.strip() or separator in line:
                yield number, line


def _raise_first_problem(path, release, from_row=0):
    """Raise for the first bad line from data row ``from_row`` (0-based) on; returns if none.

    The rows before ``from_row`` are only counted, not checked (about 0.3 s per million).
    """
    for row, (number, line) in enumerate(_data_lines(path, LAYOUTS[release.layout])):
        if row < from_row:
            continue
        text = line.rstrip(b"\r\n").decode("latin-1")  # latin-1: any stray byte can be shown
        problem = _line_problem(text, release)
        if problem is not None:
            _raise_at(path, release, number, text, problem)


def _raise_at(path, release, number, text, problem):
    shown = text if len(text) <= 120 else text[:117] + "..."
    raise InputError(
        f"{path} line {number}: {problem} (expected {LAYOUTS[release.layout].shape}, "
        f"ratings {release.stars}); the line reads {shown!r}"
    )


WHOLE_NUMBER = re.compile(r"\s*[+-]?\d+\s*")


def _line_problem(text, release):
    """What is wrong with one line of a ratings file, in words; None if nothing is."""
    separator = LAYOUTS[release.layout].separator
    fields = text.split(separator)
    if len(fields) != len(RATING_COLUMNS):
        return (
            f"found {len(fields)} field(s) separated by {separator!r}, expected "
            f"{len(RATING_COLUMNS)}"
        )

    user, movie, rating, timestamp = fields
    for what, value in (("user id", user), ("movie id", movie)):
        if WHOLE_NUMBER.fullmatch(value) is None or int(value) < 1:
            return f"the {what} {value!r} is not a positive whole number"
    if WHOLE_NUMBER.fullmatch(timestamp) is None:
        return f"the timestamp {timestamp!r} is not a whole number"

    if not rating.strip() or rating.strip().lower() == "nan":
        return "the rating is missing"
    try:
        stars = float(rating)
    except ValueError:
        return f"the rating {rating!r} is not a number"
    if math.isnan(stars):
        return "the rating is missing"
    if not release.min_rating <= stars <= release.max_rating:
        return f"the rating {stars:g} is outside {release.min_rating:g}..{release.max_rating:g}"
    if stars % release.rating_step != 0:
        return f"the rating {stars:g} is not a multiple of {release.rating_step:g}"
    return None


# ---------------------------------------------------------------------------------------------
# titles


def read_titles(folder, release):
    """Movie id -> title for ``release`` (a ``Release`` or its name) from its titles file.

    A release without titles (``ml-sample``) gives an empty dict; a release that ships a
    titles file but lacks it is an error, since a damaged folder is better found early.
    """
    release = get_release(release) if isinstance(release, str) else release
    if release.titles_file is None:
        return {}
    path = Path(folder) / release.titles_file
    if not path.is_file():
        raise InputError(
            f"{path} does not exist: the {release.name} folder is incomplete; unpack the "
            f"release again, or {how_to_provide(release)}"
        )

    if release.layout == "tab":
        return load_titles(folder)  # engine.movielens already reads and checks u.item
    text = _decode(path, release.encoding)
    if release.layout == "colons":
        return _titles_from_dat(path, text)
    return _titles_from_csv(path, text)


def _decode(path, encoding):
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(
            f"{path} line {line}: byte {data[exc.start]:#04x} is not {encoding} text; the "
            f"release's own file is {encoding}"
        ) from None


def _titles_from_dat(path, text):
    """``movies.dat``: MovieID::Title::Genres; a title may hold single colons."""
    titles = {}
    # split on newlines only: str.splitlines would also split on U+0085, a latin-1 byte
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        head, _, rest = line.partition("::")
        title, separator, _genres = rest.rpartition("::")
        if not separator or WHOLE_NUMBER.fullmatch(head) is None:
            raise InputError(
                f"{path} line {number}: expected MovieID::Title::Genres, got {line[:120]!r}"
            )
        titles[int(head)] = title
    return titles


def _titles_from_csv(path, text):
    """``movies.csv``: movieId,title,genres with a header; titles holding commas are quoted."""
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if header is None or ",".join(header).lstrip("\ufeff") != MOVIES_CSV_HEADER:
        raise InputError(
            f"{path} line 1: expected the header {MOVIES_CSV_HEADER!r}, got "
            f"{','.join(header or [])[:120]!r}"
        )

    titles = {}
    for row in rows:
        if not row:
            continue
        if len(row) != 3 or WHOLE_NUMBER.fullmatch(row[0]) is None:
            raise InputError(
                f"{path} line {rows.line_num}: expected {MOVIES_CSV_HEADER} with a title "
                f"that holds a comma in double quotes, got {','.join(row)[:120]!r}"
            )
        titles[int(row[0])] = row[1]
    return titles
