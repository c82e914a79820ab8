"""The tiny-set loader: formats, sampling, preprocessing, splitting and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from graphprune.data import Preprocessing, load_tiny_set, sample_indices, split_holdout
from graphprune.errors import GraphpruneError

PREP = Preprocessing((3, 8, 8))


def _npz(path, n=40, size=8, channels=3, labels=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"images": rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)}
    if labels:
        arrays["labels"] = np.arange(n) % 4
    np.savez(path, **arrays)
    return path


def _npy_bytes(array) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_npz_is_normalised_and_class_balanced(tmp_path):
    path = _npz(tmp_path / "d.npz")
    tiny = load_tiny_set(path, PREP, num_samples=20, seed=3)
    assert tiny.images.shape == (20, 3, 8, 8) and tiny.has_labels
    assert sorted(torch.bincount(tiny.labels).tolist()) == [5, 5, 5, 5]
    raw = np.load(path)["images"]
    mean = torch.tensor(PREP.mean).view(3, 1, 1)
    std = torch.tensor(PREP.std).view(3, 1, 1)
    first = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255
    matches = [(((first[i] - mean) / std) - tiny.images[0]).abs().max() < 1e-5 for i in range(len(raw))]
    assert any(matches)
    again = load_tiny_set(path, PREP, num_samples=20, seed=3)
    assert torch.equal(again.images, tiny.images)  # reproducible from the seed


def test_folder_with_classes_corrupt_files_and_resizing(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    tiny = load_tiny_set(tmp_path, PREP)
    assert tiny.images.shape == (6, 3, 8, 8)
    assert tiny.skipped == 1 and tiny.classes == ["cat", "dog"]
    assert sorted(tiny.labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_folder_without_classes_and_grey_model(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(tmp_path / "a" / "b" / "y.png")
    tiny = load_tiny_set(tmp_path, Preprocessing((1, 8, 8), (0.5,), (0.5,)))
    assert tiny.images.shape == (2, 1, 8, 8) and not tiny.has_labels
    assert sorted(tiny.images.flatten().unique().tolist()) == [-1.0, 1.0]


@pytest.mark.parametrize("make,message", [
    (lambda p: p.mkdir(), "no image files"),
    (lambda p: (p.mkdir(), (p / "a.png").write_bytes(b"junk")), "no readable images"),
    (lambda p: np.savez(p.with_suffix(".npz"), images=np.zeros((4, 8, 8), np.float32)), "uint8"),
    (lambda p: np.savez(p.with_suffix(".npz"), images=np.zeros((4, 8), np.uint8)), "(N, H, W, C)"),
    (lambda p: np.savez(p.with_suffix(".npz"), pixels=np.zeros((4, 8, 8, 3), np.uint8)), "no 'images'"),
    (lambda p: p.with_suffix(".npz").write_bytes(b"PK\x03\x04 broken"), "cannot read"),
    (lambda p: np.savez(p.with_suffix(".npz"), images=np.zeros((4, 8, 8, 3), np.uint8), labels=[0, 1, -5, 2]),
     "class indices >= 0, or all -1 for unlabelled images; got -5"),  # was read as an unlabelled set
    (lambda p: np.savez(p.with_suffix(".npz"), images=np.zeros((4, 8, 8, 3), np.uint8), labels=[0, -1, 3, 2]),
     "(1 of 4 are -1)"),
    # an internal error (TypeError: np.load gave an array), a ZeroDivisionError, and one colour image
    # silently read as 32 grey images 32 x 3 pixels
    (lambda p: p.with_suffix(".npz").write_bytes(_npy_bytes(np.zeros((4, 8, 8, 3), np.uint8))),
     "one .npy array, not an .npz"),
    (lambda p: np.savez(p.with_suffix(".npz"), images=np.zeros((8, 0, 32, 3), np.uint8)), "H, W above 0"),
    (lambda p: np.savez(p.with_suffix(".npz"), images=np.zeros((32, 32, 3), np.uint8)), "one colour image?"),
    (lambda p: np.savez(p.with_suffix(".npz"), images=np.array([object()] * 4)), "pickled Python objects"),
])
def test_bad_data(tmp_path, make, message):
    target = tmp_path / "data"
    make(target)
    path = target if target.exists() else target.with_suffix(".npz")
    with pytest.raises(GraphpruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_tiny_set(path, PREP)


def test_npz_labels_all_minus_one_are_an_unlabelled_set(tmp_path):
    path = tmp_path / "u.npz"
    np.savez(path, images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.full(4, -1))
    assert not load_tiny_set(path, PREP).has_labels


def test_sample_indices_round_robin_prefixes_are_balanced():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 10)
    order = sample_indices(labels, 30, 9, seed=1)
    assert sorted(np.bincount(labels[order]).tolist()) == [3, 3, 3]
    with pytest.raises(GraphpruneError):
        sample_indices(labels, 30, 0, seed=1)


def test_split_holdout_sizes(tmp_path):
    tiny = load_tiny_set(_npz(tmp_path / "d.npz", n=100), PREP)
    train, held = split_holdout(tiny)
    assert (len(train), len(held)) == (80, 20)
    small = tiny.subset(range(20))
    train, held = split_holdout(small)
    assert (len(train), len(held)) == (10, 10)  # at least 16 wanted, never more than half
    with pytest.raises(GraphpruneError, match="at least 4"):
        split_holdout(tiny.subset(range(3)))


def _flat_folder(folder, names=("a.png", "b.png", "c.png", "d.png")):
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((8, 8, 3), 60 * i, dtype=np.uint8)).save(folder / name)
    return folder


@pytest.mark.parametrize("csv_text", [
    "file,imagenet_class_index,wnid,class_name_from_filename\n"  # the ImageNet evaluation list's layout
    "a.png,7,n1,cat\nb.png,3,n2,dog\nc.png,7,n1,cat\nd.png,0,n3,fish\n",
    "image,class,class_index\na.png,cat,7\nb.png,dog,3\nc.png,cat,7\nd.png,fish,0\n",  # names passed over
    "name,target\r\na.png,7\r\nb.png,3\r\n\r\nc.png,7\r\nd.png,0\r\n",
    "a.png,7\nb.png,3\nc.png,7\nd.png,0\n",  # two columns, no header
    "path,y_true\na.png,7\nb.png,3\nc.png,7\nd.png,0\n",  # two columns: the second is the label
    "file;label\na.png;7\nb.png;3\nc.png;7\nd.png;0\n",  # a comma-decimal locale's spreadsheet
    "file\tlabel\na.png\t7\nb.png\t3\nc.png\t7\nd.png\t0\n",
])
def test_flat_folder_with_labels_csv(tmp_path, csv_text, caplog):
    folder = _flat_folder(tmp_path / "eval")
    (folder / "labels.csv").write_text(csv_text)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "unlisted.png")  # not in the CSV: not read
    with caplog.at_level("WARNING", logger="graphprune"):
        tiny = load_tiny_set(folder, PREP)
    assert tiny.has_labels and len(tiny) == 4
    assert "labels.csv names 4 of the 5 images in" in caplog.text and "the other 1 is not read" in caplog.text
    by_value = {round(float(img.mean() * PREP.std[0] + PREP.mean[0]) * 255 / 60): int(label)
                for img, label in zip(tiny.images[:, :1], tiny.labels)}  # image i is grey 60 * i
    assert by_value == {0: 7, 1: 3, 2: 7, 3: 0}
    assert torch.equal(load_tiny_set(folder / "labels.csv", PREP).labels.sort().values, tiny.labels.sort().values)


@pytest.mark.parametrize("csv_text,message", [
    ("file,label\na.png,1\nz.png,2\n", "names 1 files not in"),
    ("file,wnid,name\na.png,n1,cat\n", "no label column (columns: file, wnid, name)"),
    ("file,label\na.png,cat\n", "line 2: label 'cat' is not a non-negative integer (column 'label')"),
    ("file,label\na.png,-1\n", "label '-1' is not a non-negative integer"),
    ("file,label\na.png,1.5\n", "label '1.5'"),
    ("file,label\na.png,1\na.png,2\n", "names 'a.png' twice (line 3)"),
    ("file,label\n../a.png,1\n", "is not a file name inside"),
    ("file,wnid,label\na.png,n1\n", "line 2 has 2 columns; the labels are in column 3"),
    ("file,label\n", "lists no images"),
    ("", "lists no images"),
    ("label,file\n7,a.png\n", "the first column must name the files; 'label' holds the labels"),
    ("gone.png,1\na.png,2\n", "names 1 files not in"),  # was taken for a header and dropped
])
def test_broken_labels_csv(tmp_path, csv_text, message):
    folder = _flat_folder(tmp_path / "eval")
    (folder / "labels.csv").write_text(csv_text)
    with pytest.raises(GraphpruneError) as exc:
        load_tiny_set(folder, PREP)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_labels_csv_that_is_not_text(tmp_path):
    folder = _flat_folder(tmp_path / "eval")
    (folder / "labels.csv").write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(GraphpruneError, match="cannot read labels.csv as CSV"):
        load_tiny_set(folder, PREP)


def test_images_with_a_channel_count_the_model_cannot_take(tmp_path):
    path = _npz(tmp_path / "two.npz", channels=2)
    with pytest.raises(GraphpruneError, match="two.npz: images have 2 channels; the model takes 3"):
        load_tiny_set(path, PREP)
    assert load_tiny_set(_npz(tmp_path / "grey.npz", channels=1), PREP).images.shape[1] == 3  # grey is converted


def test_a_four_channel_model_gets_photos_opaque_and_the_default_statistics_named(tmp_path):
    """An RGBA model refused RGB photos, and without --mean blamed "--mean has 3 values"."""
    rgba = Preprocessing((4, 8, 8), (0.5,) * 4, (0.5,) * 4)
    for channels in (1, 3):
        images = load_tiny_set(_npz(tmp_path / f"c{channels}.npz", channels=channels), rgba).images
        assert images.shape[1] == 4 and bool((images[:, 3] == 1).all())  # alpha 1 is (1 - 0.5) / 0.5
    with pytest.raises(GraphpruneError, match=r"mean has 3 values \(ImageNet's, the default\); the model takes 4 "
                                              r"channels: give --mean with 4 values"):
        load_tiny_set(_npz(tmp_path / "c3.npz", channels=3), Preprocessing((4, 8, 8)))


def test_crop_takes_the_centre_share_of_the_resized_image(tmp_path):
    # 8x8 images for a 4x4 model: crop 0.5 resizes the shorter side to 4 / 0.5 = 8 (no resize) and
    # keeps the centre 4x4; the default resizes to 4 and keeps everything
    path = _npz(tmp_path / "d.npz", n=1)
    raw = torch.from_numpy(np.load(path)["images"]).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(PREP.mean).view(1, 3, 1, 1), torch.tensor(PREP.std).view(1, 3, 1, 1)
    centre = load_tiny_set(path, Preprocessing((3, 4, 4), crop=0.5))
    assert torch.allclose(centre.images, (raw[..., 2:6, 2:6] - mean) / std, atol=1e-5)
    whole = load_tiny_set(path, Preprocessing((3, 4, 4)))
    assert not torch.allclose(whole.images, centre.images)
    for bad in (0.0, 1.5):
        with pytest.raises(GraphpruneError, match="crop must be in"):
            load_tiny_set(path, Preprocessing((3, 4, 4), crop=bad))


def test_deep_pixels_and_exif_orientation_are_read_as_a_viewer_shows_them(tmp_path):
    """A 16-bit PNG read all white and a float TIFF all black (Pillow's RGB conversion clips them);
    a phone's portrait photo (stored sideways, EXIF orientation 6) was read sideways."""
    ramp = np.linspace(0, 1, 64).reshape(8, 8)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(ramp.astype(np.float32), mode="F").save(tmp_path / "float.tif")
    tiny = load_tiny_set(tmp_path, Preprocessing((1, 8, 8), (0.0,), (1.0,)))
    for image in tiny.images:
        assert torch.allclose(image[0], torch.from_numpy(ramp).float(), atol=1 / 255)
    twelve = tmp_path / "twelve"  # a 12-bit camera's image in a 16-bit file read near black (at most 15/255)
    twelve.mkdir()
    Image.fromarray((ramp * 4095).astype(np.uint16)).save(twelve / "deep.png")
    nan = ramp.astype(np.float32)
    nan[0, 0] = np.nan  # one bad pixel turned the whole image near black
    Image.fromarray(nan, mode="F").save(twelve / "nan.tif")
    for image in load_tiny_set(twelve, Preprocessing((1, 8, 8), (0.0,), (1.0,))).images:
        assert torch.allclose(image[0].flatten()[1:], torch.from_numpy(ramp).float().flatten()[1:], atol=1 / 255)
    stated = tmp_path / "stated"  # a dark 16-bit photo whose sBIT says 16 bits is read as dark as it is
    stated.mkdir()
    info = PngImagePlugin.PngInfo()
    info.add(b"sBIT", bytes([16]))
    Image.fromarray((ramp * 3000).astype(np.uint16)).save(stated / "dark.png", pnginfo=info)
    (image,) = load_tiny_set(stated, Preprocessing((1, 8, 8), (0.0,), (1.0,))).images
    assert torch.allclose(image[0], torch.from_numpy(ramp * 3000 / 65535).float(), atol=1 / 255)
    photo = tmp_path / "photo"
    photo.mkdir()
    stored = np.zeros((8, 16, 3), np.uint8)
    stored[:, :8] = 255  # left half white as stored; the viewer turns it 90 degrees clockwise: top half
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(photo / "p.png", exif=exif)
    (image,) = load_tiny_set(photo, Preprocessing((1, 16, 8), (0.0,), (1.0,)), seed=0).images
    assert image.shape == (1, 16, 8) and image[0, :8].min() == 1.0 and image[0, 8:].max() == 0.0


def test_folders_read_as_a_user_keeps_them(tmp_path, caplog):
    """Dot files (macOS's ._photo.jpg) were unreadable images counted silently, and one at the top
    level turned class folders into an unlabelled set; train/<class>/ under one folder had no
    classes; symlinked folders were not followed; skipped files were never named."""
    rng = np.random.default_rng(0)
    data = tmp_path / "imagenet" / "train"
    for cls in ("n01", "n02"):
        (data / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(data / cls / "a.png")
    (data.parent / "._cover.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (data / "n02" / ".hidden").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "n02" / ".hidden" / "thumb.png")
    elsewhere = tmp_path / "more"
    elsewhere.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(elsewhere / "b.png")
    (data / "n03").symlink_to(elsewhere)
    tiny = load_tiny_set(tmp_path / "imagenet", PREP)
    assert tiny.classes == ["n01", "n02", "n03"] and sorted(tiny.labels.tolist()) == [0, 1, 2] and tiny.skipped == 0
    (data / "n02" / "up").symlink_to(tmp_path)  # a link to a folder holding the data: not its images
    (data / "n02" / "root").symlink_to("/")
    assert len(load_tiny_set(tmp_path / "imagenet", PREP)) == 3
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "stray.png")
    (data / "n01" / "broken.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level("WARNING", logger="graphprune"):
        tiny = load_tiny_set(data, PREP)
    assert not tiny.has_labels and tiny.skipped == 1
    assert "not read as class folders: 1 of 5 images lie outside its 3 sub-folders (e.g. stray.png)" in caplog.text
    assert "skipped 1 file not readable as an image, or over Pillow's size limit for one (e.g. broken.jpg)" in \
        caplog.text


def test_a_class_folder_named_by_a_unicode_digit_is_a_name(tmp_path):
    """'²'.isdigit() is true and int('²') raises: an internal error."""
    for name in ("²", "3"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name / "a.png")
    assert load_tiny_set(tmp_path, PREP).classes == ["3", "²"]


def test_class_folders_the_reader_cannot_take_as_classes_are_said(tmp_path, caplog):
    """One folder named by a class index, or train/<class>/ next to val/<class>/: read without
    labels, and nothing said (the evaluation then reported no top-1 without a word)."""
    for folder in (tmp_path / "one" / "3", tmp_path / "split" / "train" / "n01", tmp_path / "split" / "val" / "n01"):
        folder.mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    with caplog.at_level("WARNING", logger="graphprune"):
        assert not load_tiny_set(tmp_path / "one", PREP).has_labels
        assert not load_tiny_set(tmp_path / "split", PREP).has_labels
    assert "its one sub-folder, 3, is not read as a class" in caplog.text
    assert "not read as class folders: the images lie two levels down (e.g. train/n01/a.png)" in caplog.text
