"""`facerace audit` end to end on the fixture faces, reading predictions back, grouping and bad inputs."""

import csv
import json
import shutil

import numpy as np
import pytest
from conftest import synthetic_heldout
from test_cli import run

import facerace
from facerace.apps.audit import CSV_COLUMNS, Engine, SmallGroupWarning, composition, read_predictions
from facerace.errors import InvalidParameterError, NoFaceFoundError
from facerace.model import load_config

pytestmark = pytest.mark.filterwarnings("ignore::facerace.apps.audit.SmallGroupWarning")
CLASSES7 = ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern")


@pytest.fixture(scope="module")
def audited(tmp_path_factory, faces, bad_inputs, model_with_heldout):
    """One CLI audit of the fixture faces (two folders) and four bad inputs."""
    base = tmp_path_factory.mktemp("collection")
    for i, face in enumerate(faces):
        (base / ("a" if i < 4 else "b")).mkdir(exist_ok=True)
        shutil.copy(face, base / ("a" if i < 4 else "b") / face.name)
    bad = [bad_inputs[k] for k in ("not_image", "truncated", "empty", "blank")]
    out = base / "audit"
    code, stdout, err = run("audit", base / "a", base / "b", *bad, "--out", out, "--model", model_with_heldout,
                            "--by", "folder", "--replicates", "200", "--workers", "1")
    return code, err, out, base


def test_cli_writes_every_file_with_the_documented_columns(audited):
    code, err, out, base = audited
    assert code == 0 and "Traceback" not in err, err
    for name in ("composition.csv", "composition.json", "composition.png", "faces.jsonl", "report.md"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "composition.csv").open()))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["group"] for r in rows[::7]] == ["all", str(base / "a"), str(base / "b")]
    for group in ("all", str(base / "a"), str(base / "b")):
        part = [r for r in rows if r["group"] == group]
        assert [r["class"] for r in part] == list(CLASSES7)
        assert sum(float(r["estimate"]) for r in part) == pytest.approx(1, abs=1e-3)
        assert sum(float(r["count_share"]) for r in part) == pytest.approx(1, abs=1e-3)
        for r in part:
            assert 0 <= float(r["ci_low"]) <= float(r["ci_high"]) <= 1 and 0 <= float(r["estimate"]) <= 1
    assert {r["faces"] for r in rows} == {"7", "4", "3"}


def test_bad_inputs_are_counted_not_fatal(audited):
    _, err, out, _ = audited
    summary = json.loads((out / "composition.json").read_text())
    assert summary["skipped"] == {"too_small": 0, "no_face": 1, "error": 3}
    assert summary["faces"] == 7 and summary["images"] == 11
    assert summary["method"] == "adjusted" and summary["method_used"] in ("pacc", "em")
    assert summary["model"]["name"] == "default" and summary["scheme"] == "fairface7"
    assert len(summary["rows"]) == 21 and tuple(summary["rows"][0]) == CSV_COLUMNS
    statuses = [json.loads(line)["status"] for line in (out / "faces.jsonl").read_text().splitlines()]
    assert statuses.count("ok") == 7 and statuses.count("error") == 3 and statuses.count("no_face") == 1
    # every group is small, and the bad inputs' folder has no face: one summary warning line each, on stderr
    assert err.count("warning:") == 2 and "3 group(s) have fewer than 50 faces" in err and "no classified face" in err


def test_report_states_method_and_limits(audited):
    report = (audited[2] / "report.md").read_text()
    for phrase in ("perceived", "bootstrap", "resampling the faces", "## Limits", "how the photos look", "fewer than 50"):
        assert phrase in report, phrase


def test_from_predictions_gives_the_same_composition(audited, tmp_path, model_with_heldout):
    out = audited[2]
    again = tmp_path / "again"
    code, _, err = run("audit", "--from", out / "faces.jsonl", "--out", again, "--model", model_with_heldout,
                       "--by", "folder", "--replicates", "200")
    assert code == 0, err
    assert (again / "composition.csv").read_text() == (out / "composition.csv").read_text()
    assert not (again / "faces.jsonl").exists()


def test_predictions_in_csv_parquet_and_with_bad_lines(audited, tmp_path):
    rows = [json.loads(line) for line in (audited[2] / "faces.jsonl").read_text().splitlines()]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n{\"status\": \"ok\"}\n")
    back = list(read_predictions(jsonl))
    assert len(back) == len(rows) + 2 and back[-2]["status"] == "error"
    probe = facerace.audit(predictions=jsonl, method="count", replicates=50)
    assert probe.groups[0].skipped["error"] == 3 + 2

    flat = tmp_path / "p.csv"
    with open(flat, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "face", "status", "label", *(f"p_{c}" for c in CLASSES7)])
        for r in rows:
            probs = r["probabilities"] or {}
            w.writerow([r["path"], r["face"], r["status"], r["label"], *(probs.get(c, "") for c in CLASSES7)])
    from_csv = facerace.audit(predictions=flat, method="count", replicates=50)
    assert from_csv.rows() == probe.rows()

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    table = pa.Table.from_pylist([{"path": r["path"], "status": r["status"], "probabilities": r["probabilities"]}
                                  for r in rows])
    pq.write_table(table, tmp_path / "p.parquet")
    from_parquet = facerace.audit(predictions=tmp_path / "p.parquet", method="count", replicates=50)
    assert from_parquet.rows() == probe.rows()


def test_group_by_a_csv_column(faces, tmp_path, model_with_heldout):
    listing = tmp_path / "list.csv"
    shutil.copytree(faces[0].parent, tmp_path / "imgs", ignore=shutil.ignore_patterns("*.csv", "*.md"))
    listing.write_text("file,campaign\n" + "".join(f"imgs/{f.name},{'spring' if i % 2 else 'autumn'}\n"
                                                  for i, f in enumerate(faces)) + "imgs/missing.jpg,spring\n")
    with pytest.warns(SmallGroupWarning):
        result = facerace.audit([str(listing)], by="campaign", model=model_with_heldout, replicates=50, engine=Engine(workers=1))
    assert [(g.name, g.faces) for g in result.groups] == [("all", 7), ("autumn", 4), ("spring", 3)]
    assert result.groups[2].skipped["error"] == 1
    d = json.loads(json.dumps(result.to_dict()))
    assert d["rows"] == result.rows() and len(d["rows"]) == 21
    assert result.plot(tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(InvalidParameterError, match="its columns are: file, campaign"):
        facerace.audit([str(listing)], by="season", model=model_with_heldout)
    with pytest.raises(InvalidParameterError, match="needs CSV inputs"):
        facerace.audit([str(faces[0])], by="season", model=model_with_heldout)


def test_a_model_without_heldout_statistics(audited, tmp_path):
    """The shipped default may predate the held-out statistics: adjusted says so, count still works."""
    config = load_config("default")
    faces_jsonl = audited[2] / "faces.jsonl"
    if not config.heldout:
        code, out, err = run("audit", "--from", faces_jsonl, "--out", tmp_path / "x")
        assert code == 2 and "held-out statistics" in err and "--method count" in err and not out
    code, _, err = run("audit", "--from", faces_jsonl, "--out", tmp_path / "y", "--method", "count", "--scheme",
                       "race6", "--replicates", "50")
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "y" / "composition.csv").open()))
    assert [r["class"] for r in rows] == ["White", "Black", "Latino_Hispanic", "Asian", "Indian", "Middle Eastern"]
    assert all(r["estimate"] == r["count_share"] for r in rows)


def test_usage_errors(tmp_path, faces, model_with_heldout):
    for args in (("audit", "--out", tmp_path / "a"),  # nothing to audit
                 ("audit", faces[0], "--out", tmp_path / "b", "--method", "acc"),
                 ("audit", faces[0], "--out", tmp_path / "c", "--scheme", "race9"),
                 ("audit", "--from", tmp_path / "p.txt", "--out", tmp_path / "d"),
                 ("audit", faces[0], "--out", tmp_path / "e", "--by", "season", "--model", model_with_heldout),
                 ("audit", "no/such.jpg", "--out", tmp_path / "f", "--model", model_with_heldout),
                 ("audit", faces[0], "--out", tmp_path / "g", "--scheme", "race4", "--model", "nope")):
        code, out, err = run(*args)
        assert code == 2 and "Traceback" not in err and out == "", args
    assert not any(tmp_path.iterdir())  # no output folder is made before the inputs are checked


def _rows(probs, scheme_classes, status="ok", group=None):
    return [{"path": f"{i}.jpg", "status": status, "group": group,
             "probabilities": dict(zip(scheme_classes, p)) if status == "ok" else None} for i, p in enumerate(probs)]


def test_composition_of_rows_adjusts_and_merges():
    """Every face is 0.7 White-like and 0.3 Black-like (held-out profiles): counting says 100% White, PACC
    70/30."""
    held = synthetic_heldout()
    m = held.confusion()
    probs = np.tile(0.7 * m[:, 0] + 0.3 * m[:, 1], (100, 1))
    result = composition(_rows(probs, CLASSES7), model={"name": "m", "version": "1"}, model_scheme="fairface7",
                         heldout=held, method="pacc", replicates=100)
    est = dict(zip(result.classes, result.groups[0].estimate))
    count = dict(zip(result.classes, result.groups[0].count_share))
    assert count["White"] == 1.0 and est["White"] == pytest.approx(0.7, abs=1e-3)
    # every face is a blend no held-out face looks like: the label-free shift test says so, and nothing else
    assert [w for w in result.warnings if "top probabilities" not in w] == [] and result.shift["differs"]
    assert "--sample" in result.warnings[0] and "Do these photos look like the training photos" in result.report()
    assert result.to_dict()["shift_test"]["p_value"] < 0.05
    assert est["Black"] == pytest.approx(0.3, abs=1e-3)
    merged = composition(_rows(probs, CLASSES7), model={"name": "m", "version": "1"}, model_scheme="fairface7",
                         heldout=held, method="pacc", scheme="utk5", replicates=100)
    assert merged.classes == ("White", "Black", "Asian", "Indian", "Others")
    assert sum(merged.groups[0].estimate) == pytest.approx(1, abs=1e-3)


def test_composition_of_coarser_rows_uses_converted_heldout():
    race6 = ("White", "Black", "Latino_Hispanic", "Asian", "Indian", "Middle Eastern")
    probs = np.tile([0.1, 0.1, 0.1, 0.5, 0.1, 0.1], (60, 1))
    result = composition(_rows(probs, race6), model={"name": "m", "version": "1"}, model_scheme="fairface7",
                         heldout=synthetic_heldout(), method="pacc", replicates=50)
    assert result.scheme == "race6" and result.heldout_faces == 140
    with pytest.raises(NoFaceFoundError, match="2 error"):
        composition(_rows([[1.0], [1.0]], race6, status="error"), model={"name": "m", "version": "1"},
                    model_scheme="fairface7", method="count")
