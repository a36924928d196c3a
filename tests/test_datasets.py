import shutil

import pytest
from conftest import FIXTURES, needs_dataset

from facerace.errors import DatasetError, InvalidParameterError
from facerace.training.datasets import open_dataset, parse_utk_name, race_gender_counts, utk_age_group


def make_fairface(root, rows, split="val"):
    (root / split).mkdir(parents=True, exist_ok=True)
    lines = ["file,age,gender,race,service_test"]
    for name, race in rows:
        if name != "missing":
            shutil.copy(FIXTURES / "354.jpg", root / split / name)
        lines.append(f"{split}/{name},20-29,Male,{race},False")
    (root / f"fairface_label_{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_fairface_reads_labels_and_reports_problems(tmp_path):
    root = make_fairface(tmp_path, [("1.jpg", "Black"), ("2.jpg", "Martian"), ("missing", "White")])
    ds = open_dataset(f"fairface:{root}", "val")
    assert [s.label for s in ds.samples] == ["Black"] and ds.samples[0].age == "20-29"
    assert len(ds.problems) == 2 and "unknown race 'Martian'" in ds.problems[0] and "is missing" in ds.problems[1]


def test_fairface_missing_split_says_which_exist(tmp_path):
    make_fairface(tmp_path, [("1.jpg", "Black")], split="val")
    with pytest.raises(DatasetError, match="fairface_label_val.csv"):
        open_dataset(f"fairface:{tmp_path}", "train")


def test_dataset_spec_errors(tmp_path):
    with pytest.raises(DatasetError, match="KIND:PATH"):
        open_dataset(str(tmp_path))
    with pytest.raises(InvalidParameterError, match="dataset kind"):
        open_dataset(f"imagenet:{tmp_path}")
    with pytest.raises(DatasetError, match="not a folder"):
        open_dataset(f"fairface:{tmp_path}/nope")


def test_utk_names():
    s = parse_utk_name("26_1_2_20170116174525125.jpg.chip.jpg")
    assert (s.label, s.gender, s.age) == ("Asian", "Female", "20-29")
    assert "malformed" in parse_utk_name("39_1_20170116174525125.jpg.chip.jpg")
    assert "out-of-range" in parse_utk_name("30_0_7_20170116174525125.jpg.chip.jpg")
    assert [utk_age_group(a) for a in (1, 5, 69, 70)] == ["0-2", "3-9", "60-69", "more than 70"]


def test_utk_folder_or_parent_and_malformed_skipped(tmp_path):
    folder = tmp_path / "UTKFace"
    folder.mkdir()
    for name in ("26_1_2_20170116174525125.jpg.chip.jpg", "61_1_20170109150557335.jpg.chip.jpg"):
        shutil.copy(FIXTURES / "354.jpg", folder / name)
    for spec in (f"utkface:{tmp_path}", f"utkface:{folder}"):
        ds = open_dataset(spec, "all")
        assert len(ds.samples) == 1 and len(ds.problems) == 1


def test_real_datasets_have_the_documented_sizes():
    from facerace.labels import SCHEMES

    ff = open_dataset(f"fairface:{needs_dataset('fairface')}", "val")
    assert len(ff.samples) == 4062 and not ff.problems
    assert sum(r.get("Female", 0) for r in race_gender_counts(ff.samples).values()) == 1191
    train = race_gender_counts(open_dataset(f"fairface:{needs_dataset('fairface')}", "train").samples,
                               SCHEMES["fairface7"].classes)  # the counts the datasets README documents
    assert train["Middle Eastern"] == {"Female": 1331, "Male": 2969} and train["White"] == {"Female": 1780, "Male": 2520}
    assert sum(r["Female"] for r in train.values()) == 12011 and sum(r["Male"] for r in train.values()) == 18089
    utk = open_dataset(f"utkface:{needs_dataset('utkface')}", "all")
    assert len(utk.samples) + len(utk.problems) == 10000


def test_folder_per_class_and_scheme_inference(tmp_path):
    for cls in ("white", "Black", "asian"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        shutil.copy(FIXTURES / "354.jpg", tmp_path / "train" / cls / "a.jpg")
    ds = open_dataset(f"folder:{tmp_path}", "train")
    assert ds.scheme == "race6" and sorted(s.label for s in ds.samples) == ["Asian", "Black", "White"]
    (tmp_path / "train" / "martian").mkdir()
    shutil.copy(FIXTURES / "354.jpg", tmp_path / "train" / "martian" / "b.jpg")
    ds = open_dataset(f"folder:{tmp_path}", "train")
    assert ds.problems == ["train/martian/b.jpg: unknown label 'martian'"]


def test_generic_csv_with_columns_and_splits(tmp_path):
    shutil.copy(FIXTURES / "354.jpg", tmp_path / "x.jpg")
    listing = tmp_path / "labels.csv"
    listing.write_text("img,race,split\nx.jpg,East Asian,train\nx.jpg,Latino,train\ny.jpg,White,train\nx.jpg,White,val\n")
    ds = open_dataset(f"csv:{listing}", "train", path_column="img", label_column="race")
    assert ds.scheme == "fairface7" and [s.label for s in ds.samples] == ["East Asian", "Latino_Hispanic"]
    assert ds.problems == ["labels.csv:4: " + f"{tmp_path / 'y.jpg'} is missing"]
    with pytest.raises(DatasetError, match="its columns are: img, race, split"):
        open_dataset(f"csv:{listing}", "train")


def test_fairface_csv_beside_the_wrong_folder_says_where_images_are(tmp_path):
    root = tmp_path / "FairFace"
    make_fairface(root / "fairface-img-margin025-trainval", [("1.jpg", "Black")], split="train")
    (root / "fairface-img-margin025-trainval" / "fairface_label_train.csv").rename(root / "fairface_label_train.csv")
    with pytest.raises(DatasetError, match="They are under .*fairface-img-margin025-trainval"):
        open_dataset(f"fairface:{root}", "train")


def test_datasets_check_cli(tmp_path, capsys):
    from facerace.apps.cli import main

    root = make_fairface(tmp_path / "ff", [("1.jpg", "Black"), ("missing", "White")])
    (root / "val" / "2.jpg").write_bytes(b"not a jpeg")
    with open(root / "fairface_label_val.csv", "a") as f:
        f.write("val/2.jpg,3-9,Male,White,False\n")
    assert main(["datasets", "check", f"fairface:{root}", "--quiet"]) == 0  # problems are listed, not fatal
    out = capsys.readouterr().out
    assert "1 readable images" in out and "2 problem(s)" in out
    assert "val/missing is missing" in out and "2.jpg: not an image" in out
    assert main(["datasets", "check", f"fairface:{root}", "--quiet", "--strict"]) == 1
    capsys.readouterr()
    archive = tmp_path / "fairface-img-margin025-trainval.zip"
    archive.write_bytes(b"PK\x03\x04")
    assert main(["datasets", "check", f"fairface:{archive}"]) == 2
    assert "unzip" in capsys.readouterr().err
