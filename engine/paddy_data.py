"""Find and check the Paddy Doctor competition folder, as Kaggle lays it out.

    DIR/train.csv               image_id, label, variety, age (one row per training image)
    DIR/train_images/<label>/   the training images, one folder per disease label
    DIR/test_images/            the test images, flat
    DIR/sample_submission.csv   image_id, label: the test images in the order Kaggle scores

Everything a run needs is checked here, once, before any training: a mistake found after an
hour on a GPU costs the hour.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from engine.errors import InputError

log = logging.getLogger("xlmirror")

TRAIN_CSV = "train.csv"
TRAIN_IMAGES = "train_images"
TEST_IMAGES = "test_images"
SAMPLE_SUBMISSION = "sample_submission.csv"
TRAIN_COLUMNS = ("image_id", "label", "variety")  # Kaggle's file also has age, unused here
SUBMISSION_COLUMNS = ("image_id", "label")

LAYOUT = (
    f"the Paddy Doctor folder holds {TRAIN_CSV}, {TRAIN_IMAGES}/<label>/, {TEST_IMAGES}/ "
    f"and {SAMPLE_SUBMISSION} as downloaded from Kaggle"
)


@dataclass
class PaddyData:
    """A checked Paddy Doctor folder.

    ``labels`` and ``varieties`` are sorted; ``labels`` is the column order of every
    probability array a run saves.
    """

    root: Path
    train: pd.DataFrame  # image_id, label, variety, path (str, absolute); one row per image
    test: pd.DataFrame  # image_id, path; in sample_submission.csv's order
    labels: list
    varieties: list

    def counts(self):
        """Training images per label, largest first (a pandas Series)."""
        return self.train["label"].value_counts()


def load_paddy(root, check_images=True):
    """Read and check the Kaggle layout under ``root``; returns a ``PaddyData``.

    With ``check_images`` every image's header is opened with PIL (a few seconds for the
    13,876 images of the competition), so a stray file is named now, not mid-epoch. A file
    whose header is fine but whose pixel data is cut short still fails later, in fastai.

    Raises
    ------
    InputError
        Naming the file or folder that is missing or wrong, and what to do about it.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"{root} is not a folder; {LAYOUT}")

    train = _read_train_csv(root / TRAIN_CSV)
    _check_label_folders(root, train)
    train["path"] = [
        str(root / TRAIN_IMAGES / label / image_id)
        for label, image_id in zip(train["label"], train["image_id"])
    ]
    _check_listed_files_exist(root / TRAIN_CSV, train["path"])
    _report_unlisted_training_files(root, train)

    test = _read_test_images(root)
    if check_images:
        for path in list(train["path"]) + list(test["path"]):
            check_image(path)

    data = PaddyData(
        root=root,
        train=train,
        test=test,
        labels=sorted(train["label"].unique()),
        varieties=sorted(train["variety"].unique()),
    )
    log.info(
        "Paddy Doctor data in %s: %d training images in %d labels (%d varieties), "
        "%d test images", root, len(train), len(data.labels), len(data.varieties), len(test),
    )
    return data


def check_image(path):
    """Raise InputError unless PIL recognises ``path`` as an image (reads the header only)."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - the header is parsed on open; size proves it was
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(
            f"{path} is not a readable image ({exc.__class__.__name__}); replace it with the "
            "file from the Kaggle download, or remove it (and its row in the csv)"
        ) from None


def _read_csv(path, columns, filled, what):
    """``path`` as strings, with ``columns`` present and ``filled`` never blank.

    InputError naming the file otherwise; ``what`` says what the file should hold.
    """
    if not path.is_file():
        raise InputError(f"{path} does not exist; {LAYOUT}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not a readable csv ({exc}); {what}") from None
    except pd.errors.EmptyDataError:
        raise InputError(f"{path} is empty; {what}") from None

    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise InputError(
            f"{path} lacks the column(s) {', '.join(missing)}; expected a header row with "
            f"{', '.join(columns)} ({what})"
        )
    if table.empty:
        raise InputError(f"{path} has a header but no rows; {what}")

    blank = (table[list(filled)].apply(lambda column: column.str.strip()) == "").any(axis=1)
    if blank.any():
        line = int(blank.to_numpy().nonzero()[0][0]) + 2  # +1 for the header, +1 to count from 1
        raise InputError(f"{path} line {line} has an empty {'/'.join(filled)} field; fill it")

    duplicated = table["image_id"].duplicated()
    if duplicated.any():
        image_id = table["image_id"][duplicated].iloc[0]
        raise InputError(f"{path} lists image_id {image_id} more than once; keep one row")
    return table


def _read_train_csv(path):
    table = _read_csv(path, TRAIN_COLUMNS, TRAIN_COLUMNS, "one row per training image")
    return table[list(TRAIN_COLUMNS)].reset_index(drop=True)


def _check_label_folders(root, train):
    folder = root / TRAIN_IMAGES
    if not folder.is_dir():
        raise InputError(f"{folder} does not exist; {LAYOUT}")

    on_disk = {child.name for child in folder.iterdir() if child.is_dir()}
    in_csv = set(train["label"])
    no_folder = sorted(in_csv - on_disk)
    if no_folder:
        raise InputError(
            f"{root / TRAIN_CSV} has label(s) {', '.join(no_folder)} with no folder in "
            f"{folder}; every label needs {TRAIN_IMAGES}/<label>/ holding its images"
        )
    not_in_csv = sorted(on_disk - in_csv)
    if not_in_csv:
        raise InputError(
            f"{folder / not_in_csv[0]} is a label folder with no row in {root / TRAIN_CSV} "
            f"({len(not_in_csv)} such folder(s): {', '.join(not_in_csv)}); add its rows to "
            f"{TRAIN_CSV} or move the folder out"
        )


def _check_listed_files_exist(csv_path, paths):
    missing = [path for path in paths if not Path(path).is_file()]
    if missing:
        raise InputError(
            f"{missing[0]} is listed in {csv_path} but does not exist ({len(missing)} listed "
            "image(s) missing); restore the images or drop their rows"
        )


def _report_unlisted_training_files(root, train):
    listed = set(train["path"])
    unlisted = [
        path for path in (root / TRAIN_IMAGES).glob("*/*")
        if path.is_file() and str(path) not in listed
    ]
    if unlisted:
        log.warning(
            "%d file(s) in %s have no row in %s and are not used (first: %s)",
            len(unlisted), root / TRAIN_IMAGES, TRAIN_CSV, unlisted[0],
        )


def _read_test_images(root):
    folder = root / TEST_IMAGES
    if not folder.is_dir():
        raise InputError(f"{folder} does not exist; {LAYOUT}")
    on_disk = {path.name for path in folder.iterdir() if path.is_file()}
    if not on_disk:
        raise InputError(f"{folder} holds no files; copy the test images from the Kaggle download")

    sample_path = root / SAMPLE_SUBMISSION
    # Kaggle's sample leaves the label column blank: only the ids and their order count
    sample = _read_csv(sample_path, SUBMISSION_COLUMNS, ("image_id",),
                       "the test images in Kaggle's order")
    missing = [image_id for image_id in sample["image_id"] if image_id not in on_disk]
    if missing:
        raise InputError(
            f"{folder / missing[0]} is listed in {sample_path} but does not exist "
            f"({len(missing)} missing); restore the test images"
        )
    ignored = len(on_disk) - len(sample)
    if ignored:
        log.warning("%d file(s) in %s are not in %s and get no prediction",
                    ignored, folder, SAMPLE_SUBMISSION)

    return pd.DataFrame({
        "image_id": list(sample["image_id"]),
        "path": [str(folder / image_id) for image_id in sample["image_id"]],
    })
