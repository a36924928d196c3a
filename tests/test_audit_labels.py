"""`facerace audit --labels` and `--sample` end to end on the fixture faces: every kind of bad label row, the
validated estimate per group, the sample drawn, labelled on the label page's API and audited again."""

import csv
import json
import shutil

import numpy as np
import facerace
import pytest
from conftest import fixture_labels, run_cli, synthetic_heldout
from test_audit import CLASSES7

from facerace.apps.audit import CSV_COLUMNS, composition
from facerace.apps.sample import Sampler, read_labels
from facerace.errors import InvalidParameterError

pytestmark = pytest.mark.filterwarnings("ignore::facerace.errors.FaceraceWarning")
TRUE7 = {r["file"]: r["race"] for r in fixture_labels()}
UTK5 = {"White": "White", "Black": "Black", "East Asian": "Asian", "Southeast Asian": "Asian", "Indian": "Indian",
        "Latino_Hispanic": "Others", "Middle Eastern": "Others"}


@pytest.fixture(scope="module")
def collection(tmp_path_factory, faces):
    """Folders a (4 faces) and b (3 faces)."""
    base = tmp_path_factory.mktemp("labelled")
    for i, face in enumerate(faces):
        folder = base / ("a" if i < 4 else "b")
        folder.mkdir(exist_ok=True)
        shutil.copy(face, folder / face.name)
    return base


def write_labels(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["path", "face", "label"], *rows])
    return path


@pytest.fixture(scope="module")
def labelled(collection, model_with_heldout):
    """One CLI audit by folder with a labels CSV (paths relative to it, utk5 labels) holding every kind of row."""
    a, b = sorted(p.name for p in (collection / "a").iterdir()), sorted(p.name for p in (collection / "b").iterdir())
    rows = [[f"../a/{a[0]}", "0", UTK5[TRUE7[a[0]]]],
            [f"../a/{a[1]}", "", UTK5[TRUE7[a[1]]].lower()],  # empty face = 0; any case
            [str(collection / "a" / a[2]), "0", UTK5[TRUE7[a[2]]]],  # an absolute path
            [f"../a/{a[3]}", "0", UTK5[TRUE7[a[3]]]],
            [f"../a/./{a[3]}", "0", UTK5[TRUE7[a[3]]]],  # the same face again, same label: counted once
            [f"../b/{b[0]}", "0", "White"], [f"../b/{b[0]}", "0", "Black"],  # conflicting
            [f"../b/{b[1]}", "0", "Martian"],  # unknown label
            [f"../b/{b[2]}", "0", "not a face"],
            [f"../b/{b[2]}", "2", "White"],  # no face 2 in that image
            ["../missing.jpg", "0", "White"],  # no such audited image
            ["", "0", "White"], [f"../a/{a[0]}", "x", "White"],  # bad rows
            [f"../b/{b[1]}", "0", "skip"], [f"../b/{b[1]}", "0", ""]]  # skipped by the labeller
    labels = write_labels(collection / "labels" / "labels.csv", rows)
    out = collection / "audit-labelled"
    code, stdout, err = run_cli("audit", collection / "a", collection / "b", "--by", "folder", "--labels", labels,
                                "--out", out, "--model", model_with_heldout, "--replicates", "100", "--workers", "1")
    return code, err, out, labels


def test_labels_give_validated_groups_and_say_how(labelled, collection):
    code, err, out, _ = labelled
    assert code == 0 and "Traceback" not in err, err
    rows = list(csv.DictReader((out / "composition.csv").open()))
    assert tuple(rows[0]) == CSV_COLUMNS and CSV_COLUMNS[:7] == ("group", "class", "faces", "count_share",
                                                                 "estimate", "ci_low", "ci_high")
    by_group = {g: [r for r in rows if r["group"] == g] for g in ("all", str(collection / "a"), str(collection / "b"))}
    assert [r["class"] for r in by_group["all"]] == ["White", "Black", "Asian", "Indian", "Others"]  # from the labels
    assert {(r["method"], r["labelled"]) for r in by_group[str(collection / "a")]} == {("validated", "4")}
    assert {(r["method"], r["labelled"]) for r in by_group[str(collection / "b")]} == {("pacc", "0")}
    assert {(r["method"], r["labelled"]) for r in by_group["all"]} == {("validated", "4")}
    # group a is fully labelled: its validated estimate is exactly its labelled shares, interval of width 0
    truth = {"Black": 0, "Asian": 0, "Indian": 0, "Others": 0, "White": 0}
    for name in sorted(p.name for p in (collection / "a").iterdir()):
        truth[UTK5[TRUE7[name]]] += 0.25
    for r in by_group[str(collection / "a")]:
        assert float(r["estimate"]) == pytest.approx(truth[r["class"]]) == float(r["ci_low"]) == float(r["ci_high"])
    summary = json.loads((out / "composition.json").read_text())
    labels = summary["labels"]
    assert labels["scheme"] == "utk5" and labels["scheme_from_labels"] and labels["used"] == 4
    assert {k: v["count"] for k, v in labels["problems"].items()} == {
        "bad_row": 2, "unknown_label": 1, "conflicting": 1, "no_face": 2, "not_a_face": 1}
    assert labels["skipped"] == 2 and labels["duplicates"] == 1
    assert labels["accuracy"]["collection"]["n"] == 4 and len(labels["accuracy"]["collection"]["ci95"]) == 2
    assert labels["accuracy"]["heldout"]["n"] == 140 and len(labels["accuracy"]["confusion"]) == 5
    assert "finite-population" in summary["intervals"]["validated"]
    assert summary["groups"][2]["method"] == "pacc" and summary["groups"][2]["labelled"] == 0


def test_bad_label_rows_are_listed_and_warned_never_used(labelled):
    _, err, out, labels = labelled
    report = (out / "report.md").read_text()
    for phrase in ("## The labelled sample", "4 labelled faces used", "uniform random sample", "Martian",
                   "lines 7, 8", "no classified face 2", "missing.jpg", "not a face", "Wilson", "held-out",
                   "finite-population", "method `pacc`", "rows not used: 7".capitalize()):
        assert phrase in report, phrase
    assert "7 label row(s) not used" in err and "has no labelled face" in err and "only 4 labelled faces" in err


def test_from_predictions_with_labels_gives_the_same_composition(labelled, tmp_path, model_with_heldout):
    _, _, out, labels = labelled
    code, _, err = run_cli("audit", "--from", out / "faces.jsonl", "--by", "folder", "--labels", labels, "--out",
                           tmp_path / "again", "--model", model_with_heldout, "--replicates", "100")
    assert code == 0, err
    assert (tmp_path / "again" / "composition.csv").read_text() == (out / "composition.csv").read_text()


def test_label_usage_errors_stop_before_any_work(collection, tmp_path, model_with_heldout, monkeypatch):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("path,label\ncaf\xe9.jpg,White\n".encode("latin-1"))
    no_column = write_labels(tmp_path / "nolabel.csv", [])
    no_column.write_text("path,race\na.jpg,White\n")
    for extra in (["--labels", tmp_path / "none.csv"], ["--labels", bad], ["--labels", no_column],
                  ["--labels", tmp_path], ["--method", "validated"], ["--sample", "0"]):
        code, out, err = run_cli("audit", collection / "a", "--out", tmp_path / "out", "--model", model_with_heldout,
                                 *extra)
        assert code == 2 and "Traceback" not in err and not out, (extra, err)
        assert not (tmp_path / "out").exists()
    monkeypatch.chdir(tmp_path)  # without --out, the CLI writes the sample into the default run folder
    code, _, err = run_cli("audit", collection / "a", "--sample", "3", "--model", model_with_heldout)
    assert code == 0 and (tmp_path / "runs" / "audit" / "exp1" / "sample.csv").is_file(), err
    with pytest.raises(InvalidParameterError, match="--out"):
        facerace.audit(collection / "a", sample=3, model=model_with_heldout)  # Python: out=None writes nothing


def test_sample_then_label_page_then_labels(collection, tmp_path, model_with_heldout):
    from fastapi.testclient import TestClient

    from facerace.apps.label.app import create_app

    out = tmp_path / "s"
    code, _, err = run_cli("audit", collection / "a", collection / "b", "--by", "folder", "--sample", "2", "--out",
                           out, "--model", model_with_heldout, "--replicates", "50", "--workers", "1")
    assert code == 0, err
    last = err.strip().splitlines()[-1]
    assert "facerace label" in last and "--labels" in last and str(out / "labels.csv") in last
    sample = list(csv.DictReader((out / "sample.csv").open()))
    assert [r["group"] for r in sample] == [str(collection / "a")] * 2 + [str(collection / "b")] * 2
    assert all(r["label"] == "" and (out / r["crop"]).stat().st_size > 1000 for r in sample)
    assert tuple(sample[0]) == ("path", "face", "group", "box", "label", "crop")
    assert "uniform" in (out / "report.md").read_text()

    client = TestClient(create_app(out), base_url="http://127.0.0.1")
    state = client.get("/api/state").json()
    assert state["choices"] == [*CLASSES7, "not a face", "skip"] and state["next"] == 0
    assert client.get("/crop/0").headers["content-type"] == "image/jpeg"
    for i, row in enumerate(sample):
        from pathlib import Path

        state = client.post("/api/answer", json={"index": i, "label": TRUE7[Path(row["path"]).name]}).json()
    assert state["answered"] == 4 and state["next"] is None

    code, _, err = run_cli("audit", collection / "a", collection / "b", "--by", "folder", "--labels",
                           out / "labels.csv", "--out", tmp_path / "v", "--model", model_with_heldout,
                           "--replicates", "50", "--workers", "1")
    assert code == 0, err
    summary = json.loads((tmp_path / "v" / "composition.json").read_text())
    assert [(g["method"], g["labelled"]) for g in summary["groups"]] == [("validated", 4)] + [("validated", 2)] * 2
    assert "stratified" in summary["labels"]["all"] and summary["labels"]["used"] == 4
    assert summary["scheme"] == "fairface7"


def test_label_page_saves_every_answer_resumes_and_refuses_bad_requests(collection, tmp_path, model_with_heldout):
    from fastapi.testclient import TestClient

    from facerace.apps.label.app import create_app

    out = tmp_path / "s"
    assert run_cli("audit", collection / "a", "--sample", "3", "--out", out, "--model", model_with_heldout,
                   "--replicates", "20", "--workers", "1")[0] == 0
    client = TestClient(create_app(out), base_url="http://127.0.0.1")
    client.post("/api/answer", json={"index": 1, "label": "White"})
    client.post("/api/answer", json={"index": 0, "label": "not a face"})
    client.post("/api/answer", json={"index": 2, "label": "skip"})
    state = client.post("/api/undo", json={}).json()
    assert state["answered"] == 2 and state["next"] == 2 and state["last"] == 0
    saved = list(csv.DictReader((out / "labels.csv").open()))
    assert [r["label"] for r in saved] == ["White", "not a face"]
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]  # no partial file left behind
    again = TestClient(create_app(out), base_url="http://127.0.0.1").get("/api/state").json()
    assert again["answered"] == 2 and again["next"] == 2 and again["faces"][1]["label"] == "White"
    for body, status in (({"index": 9, "label": "White"}, 422), ({"index": 0, "label": "Martian"}, 422),
                         ({"index": True, "label": "White"}, 422), ([1, 2], 422)):
        assert client.post("/api/answer", json=body).status_code == status, body
    assert client.post("/api/answer", content=b"index=0&label=White",
                       headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 415
    assert client.post("/api/answer", json={"index": 0, "label": "White"},
                       headers={"origin": "http://evil.example"}).status_code == 403
    assert client.get("/crop/99").status_code == 404 and client.get("/crop/-1").status_code == 404
    assert client.post("/api/answer", content=b"{" + b" " * 100_000 + b"}",
                       headers={"content-type": "application/json"}).status_code == 413
    assert TestClient(create_app(out), base_url="http://evil.example").get("/api/state").status_code == 400
    assert list(csv.DictReader((out / "labels.csv").open())) == saved
    with pytest.raises(InvalidParameterError, match="no sample.csv"):
        create_app(tmp_path)


def test_sample_from_hostile_predictions(labelled, tmp_path, model_with_heldout):
    """--sample from a --from file whose face indices and boxes are of every wrong kind: every classified face can
    be drawn, none stops the audit; a box that is not one gives a crop of the whole image."""
    _, _, out, _ = labelled
    rows = [json.loads(line) for line in (out / "faces.jsonl").read_text().splitlines()]
    oddities = [("0", "[1, 2, 3, 4]"), ("x", "abc"), (-3, [1, 2, "x", 4]), (None, [0, 0, 0, 0]), (1.5, None),
                (True, [1e308, 1e308, 1, 1]), ("2", {"a": 1})]
    for row, (face, box) in zip(rows, oddities):
        row["face"], row["box"] = face, box
    hostile = tmp_path / "hostile.jsonl"
    hostile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli("audit", "--from", hostile, "--sample", "10", "--out", tmp_path / "s", "--model",
                           model_with_heldout, "--replicates", "20")
    assert code == 0 and "Traceback" not in err, err
    sample = list(csv.DictReader((tmp_path / "s" / "sample.csv").open()))
    assert len(sample) == 7 and all(r["face"].isdigit() for r in sample)
    assert all((tmp_path / "s" / r["crop"]).stat().st_size > 0 for r in sample)
    code, _, err = run_cli("label", tmp_path / "nothing-here")
    assert code == 2 and "no sample.csv" in err and "Traceback" not in err


def test_validated_composition_of_rows():
    """200 faces in two groups whose probabilities say White; the labels say Black for half: validated follows the
    labels, pacc the probabilities."""
    rng = np.random.default_rng(0)
    held = synthetic_heldout()
    rows = []
    for i in range(200):
        p = rng.dirichlet(np.ones(7)) * 0.3
        p[0] += 0.7
        rows.append({"path": f"/x/{i}.jpg", "face": 0, "status": "ok", "group": "g1" if i < 150 else "g2",
                     "probabilities": dict(zip(CLASSES7, p))})
    label_file = read_labels(write_labels(
        _tmp() / "l.csv", [[f"/x/{i}.jpg", "0", "Black" if i % 8 else "White"] for i in range(0, 200, 4)]))
    sampler = Sampler(10, seed=1)
    result = composition(rows, model={"name": "m", "version": "1"}, model_scheme="fairface7", heldout=held,
                         labels=label_file, sampler=sampler, replicates=50)
    est = dict(zip(result.classes, result.groups[0].estimate))
    assert result.method == "validated" and [g.labelled for g in result.groups] == [50, 38, 12]
    assert est["Black"] == pytest.approx(0.5, abs=0.15) and result.groups[0].ci_high[1] > 0.35
    assert {len(v) for v in sampler.faces.values()} == {10} and set(sampler.faces) == {"g1", "g2"}
    assert "stratified" in result.labels["all"]
    # the labels disagree with the model far more than its held-out faces do: the report says the photos differ
    accuracy = result.labels["accuracy"]
    assert accuracy["collection"]["ci95"][1] < accuracy["heldout"]["ci95"][0] and accuracy["differs"]
    assert "photos differ from the training data" in result.report()
    with pytest.raises(InvalidParameterError, match="needs labels"):
        composition(rows, model={"name": "m", "version": "1"}, model_scheme="fairface7", method="validated")


def test_all_combines_groups_with_and_without_labels():
    """`all` is stratified even when a group has no labels (its adjusted estimate enters with its interval's
    variance) or only one face, labelled (its label, exactly): pooling the labelled faces would over-weight the
    labelled groups."""
    held = synthetic_heldout()
    rows = [{"path": f"/x/{i}.jpg", "face": 0, "status": "ok", "group": "big" if i < 300 else "small" if i < 400
             else "one", "probabilities": dict(zip(CLASSES7, np.eye(7)[i % 7] * 0.5 + 0.5 / 7))} for i in range(401)]
    labels = read_labels(write_labels(_tmp() / "l.csv", [[f"/x/{i}.jpg", "0", CLASSES7[i % 7]]
                                                         for i in [*range(0, 300, 5), 400]]))
    result = composition(rows, model={"name": "m", "version": "1"}, model_scheme="fairface7", heldout=held,
                         labels=labels, replicates=50)
    by = {g.name: g for g in result.groups}
    assert (by["big"].method, by["big"].labelled) == ("validated", 60)
    assert (by["small"].method, by["small"].labelled) == ("pacc", 0)
    assert (by["one"].method, by["one"].labelled) == ("pacc", 1)
    assert by["all"].method == "validated" and by["all"].labelled == 61
    assert "2 group(s) with fewer than 2 labelled faces" in result.labels["all"]
    mixed = np.array(by["big"].estimate) * 300 / 401 + np.array(by["small"].estimate) * 100 / 401 \
        + np.eye(7)[400 % 7] / 401
    np.testing.assert_allclose(by["all"].estimate, mixed / mixed.sum(), atol=2e-4)
    assert all(lo <= e <= hi for e, lo, hi in zip(by["all"].estimate, by["all"].ci_low, by["all"].ci_high))


def test_sampler_is_uniform_and_seeded():
    counts = np.zeros(20)
    for seed in range(2000):
        s = Sampler(5, seed)
        for i in range(20):
            s.add("all", {"path": str(i), "face": 0, "box": None})
        counts[[int(f["path"]) for f in s.faces["all"]]] += 1
    assert np.abs(counts / 2000 - 5 / 20).max() < 0.04  # every face equally likely
    a, b = Sampler(3, 7), Sampler(3, 7)
    for s in (a, b):
        for i in range(50):
            s.add("all", {"path": str(i), "face": 0, "box": None})
    assert a.faces == b.faces


def _tmp():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp())
