"""A small Paddy Doctor folder in exactly Kaggle's layout, generated at test time.

Nothing here is real data: each label gets its own base colour (so a network has something to
learn) plus noise, and every label and variety of the competition appears.
"""

import csv
from pathlib import Path

import numpy as np
from PIL import Image

LABELS = (
    "bacterial_leaf_blight", "bacterial_leaf_streak", "bacterial_panicle_blight", "blast",
    "brown_spot", "dead_heart", "downy_mildew", "hispa", "normal", "tungro",
)
VARIETIES = (
    "ADT45", "AndraPonni", "AtchayaPonni", "IR20", "KarnatakaPonni", "Onthanel", "Ponni", "RR",
    "Surya", "Zonal",
)
# label i gets 4 + i images: 85 in all, uneven so the smallest class is bacterial_leaf_blight;
# the 68 left for training after fastai's 20% validation split hold one step of 64
IMAGES_PER_LABEL = tuple(4 + i for i in range(len(LABELS)))


def _image(rng, colour, size):
    pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def write_paddy(root, images_per_label=IMAGES_PER_LABEL, n_test=12, size=32, seed=0):
    """Write train.csv, train_images/<label>/, test_images/ and sample_submission.csv.

    Returns the folder. Images are ``size`` x ``size`` RGB JPEGs named like Kaggle's
    (``100001.jpg``), test images in a shuffled order so that sample_submission.csv's order
    differs from the sorted file names.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, (len(LABELS), 3))
    next_id = 100001

    rows = []
    for label_index, (label, count) in enumerate(zip(LABELS, images_per_label)):
        folder = root / "train_images" / label
        folder.mkdir(parents=True)
        for i in range(count):
            image_id = f"{next_id}.jpg"
            next_id += 1
            _image(rng, colours[label_index], size).save(folder / image_id)
            variety = VARIETIES[(label_index + i) % len(VARIETIES)]
            rows.append((image_id, label, variety, str(45 + i)))
    _write_csv(root / "train.csv", ("image_id", "label", "variety", "age"), rows)

    test_folder = root / "test_images"
    test_folder.mkdir()
    test_ids = [f"{200001 + i}.jpg" for i in range(n_test)]
    for i, image_id in enumerate(test_ids):
        _image(rng, colours[i % len(LABELS)], size).save(test_folder / image_id)
    order = rng.permutation(n_test)
    _write_csv(root / "sample_submission.csv", ("image_id", "label"),
               [(test_ids[i], "") for i in order])
    return root


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
