"""Issue 19, the audit's classes of problems: what `--from` rows and files are trusted, CSVs of groups, names in
every medium, bounded work and memory, the audit folder (complete or absent) and its default."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

import facerace
from facerace.apps import audit as audit_module
from facerace.apps.audit import OTHER_GROUPS, AuditResult, Engine, Tally, composition
from facerace.errors import InvalidParameterError, NoFaceFoundError
from facerace.quantify import (
    EXACT_FACES,
    MAX_REPLICATES,
    GroupStats,
    bootstrap,
    em_sample,
    interval,
    shares,
    shares_of,
)
from facerace.textout import json_text

pytestmark = pytest.mark.filterwarnings("ignore::facerace.errors.FaceraceWarning")
CLASSES7 = ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern")
SRC = Path(__file__).parents[1] / "src" / "facerace"


def _strict(text: str):
    """JSON parsed as a strict parser would: NaN, Infinity and -Infinity refused."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def _good_rows(n: int, seed: int = 0, folder: str = "photos") -> list[dict]:
    rng = np.random.default_rng(seed)
    probs = np.round(rng.dirichlet(np.ones(7), n), 4)
    return [{"path": f"{folder}/{i}.jpg", "face": 0, "status": "ok", "probabilities": dict(zip(CLASSES7, p.tolist()))}
            for i, p in enumerate(probs)]


def _jsonl(path: Path, rows: list, extra_lines: tuple[bytes, ...] = ()) -> Path:
    with open(path, "wb") as f:
        for row in rows:
            f.write(json.dumps(row).encode() + b"\n")
        for line in extra_lines:
            f.write(line + b"\n")
    return path


def _absurd() -> list[dict]:
    """Rows with status ok whose probabilities are finite numbers (or not) that are no probabilities."""
    def row(values) -> dict:
        return {"path": "bad.jpg", "face": 0, "status": "ok", "probabilities": dict(zip(CLASSES7, values))}
    return [row([1e308] * 7), row([-0.5, 1.5, 0, 0, 0, 0, 0]), row([0.5] * 7), row([float("nan")] + [1 / 6] * 6),
            row([float("inf")] + [0.0] * 6), row(["x"] * 7), row([True] + [0] * 6), row([1.0]),
            row([None] + [1 / 6] * 6)]


# ---- item 2: absurd probabilities; no NaN in any JSON ------------------------------------------------------
@pytest.mark.parametrize("method", ["count", "probability", "pacc", "em"])
def test_absurd_probabilities_are_error_rows_and_no_json_holds_nan(tmp_path, method, model_with_heldout):
    good = _good_rows(60)
    source = _jsonl(tmp_path / "p.jsonl", good + _absurd())
    result = facerace.audit(predictions=source, method=method, model=model_with_heldout, replicates=50,
                            out=tmp_path / "out")
    assert result.groups[0].faces == 60 and result.groups[0].skipped["error"] == len(_absurd())
    summary = _strict((tmp_path / "out" / "composition.json").read_text())
    assert all(math.isfinite(r["estimate"]) and 0 <= r["ci_low"] <= r["ci_high"] <= 1 for r in summary["rows"])
    clean = facerace.audit(predictions=_jsonl(tmp_path / "c.jsonl", good), method=method, model=model_with_heldout,
                           replicates=50)
    assert clean.rows() == result.rows()  # the absurd rows moved nothing


def test_json_text_never_writes_nan_or_infinity():
    data = {"a": float("nan"), "b": [np.float32("inf"), -math.inf, 1.5], "c": np.int64(3), "d": np.array([0.25])}
    assert _strict(json_text(data)) == {"a": None, "b": [None, None, 1.5], "c": 3, "d": [0.25]}


def test_every_json_writer_of_the_package_is_json_text():
    """No json.dump(s) outside textout.json_text: every JSON facerace writes is strict."""
    offenders = [f"{p.relative_to(SRC)}:{n}" for p in SRC.rglob("*.py") if p.name != "textout.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if "json.dump" in line]
    assert not offenders, offenders


# ---- item 3: an image listed twice in CSVs -----------------------------------------------------------------
def test_an_image_listed_twice_in_csvs_is_refused_by_every_verb(tmp_path, faces):
    for face in faces[:2]:
        shutil.copy(face, tmp_path / face.name)
    a, b = faces[0].name, faces[1].name
    listing = tmp_path / "list.csv"
    listing.write_text(f"file,campaign\n{a},spring\n{b},spring\n./{a},autumn\n")
    other = tmp_path / "other.csv"
    other.write_text(f"file,campaign\n{b},winter\n")
    for args in (("predict", listing, "--workers", "1"), ("embed", listing, "-o", tmp_path / "e.npz"),
                 ("audit", listing, "--by", "campaign", "--out", tmp_path / "audit", "--workers", "1"),
                 ("audit", other, listing, "--out", tmp_path / "audit2", "--workers", "1")):
        code, out, err = run_cli(*args)
        assert code == 2 and "Traceback" not in err and out == "", (args, err)
        assert "list each image once" in err and "line" in err, err
    code, _, err = run_cli("predict", listing, "--workers", "1")
    assert "list.csv, line 4" in err and "list.csv, line 2" in err
    assert not (tmp_path / "e.npz").exists() and not (tmp_path / "audit").exists()


# ---- item 6: --from files that are damaged -----------------------------------------------------------------
def test_damaged_lines_of_a_predictions_file_are_counted_error_rows(tmp_path):
    good = _good_rows(30)
    probs = ", ".join(f'"{c}": 0.1' for c in CLASSES7[1:])
    huge = ('{"path": "h.jpg", "status": "ok", "probabilities": {"White": 1' + "0" * 400 + ", " + probs + "}}").encode()
    lines = (huge, b'{"path": "caf\xe9.jpg", "status": "no_face"}', b"[" * 100_000, b"{" * 100_000,
             b'{"path": "long.jpg", "status": "ok", "x": "' + b"y" * (2 << 20) + b'"}', b"not json", b"[]")
    source = _jsonl(tmp_path / "p.jsonl", good, lines)
    result = facerace.audit(predictions=source, method="count", replicates=20)
    assert result.groups[0].faces == 30 and result.groups[0].skipped["error"] == len(lines)

    flat = tmp_path / "p.csv"
    header = "path,face,status," + ",".join(f"p_{c}" for c in CLASSES7)
    body = "".join(f"{r['path']},0,ok," + ",".join(str(v) for v in r["probabilities"].values()) + "\n" for r in good)
    flat.write_bytes((header + "\n" + body).encode() + b"x.jpg,0,ok," + b"9" * 200_000 + b",0,0,0,0,0,0\n"
                     + "caf\u00e9.jpg,0,ok,1,0,0,0,0,0,0\n".encode("latin-1") + b"y.jpg,0,ok,1e400,0,0,0,0,0,0\n")
    result = facerace.audit(predictions=flat, method="count", replicates=20)
    assert result.groups[0].faces == 30 and result.groups[0].skipped["error"] == 3


def test_parquet_predictions_of_other_types_are_error_rows_and_unreadable_files_usage_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    good = _good_rows(30)
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(good), folder / "part-0.parquet")
    (folder / "README.txt").write_text("these are the faces\n")
    pq.write_table(pa.table({"path": ["x.jpg", "y.jpg"], "status": ["ok", "ok"],
                             "probabilities": pa.array([[1, 0], [0, 1]], pa.list_(pa.int64()))}),
                   folder / "part-1.parquet")
    pq.write_table(pa.table({"path": ["z.jpg"], "status": ["ok"],
                             "probabilities": [dict.fromkeys(CLASSES7, "1/7")]}), folder / "part-2.parquet")
    code, out, err = run_cli("audit", "--from", folder, "--method", "count", "--out", tmp_path / "o")
    assert code == 0 and "Traceback" not in err and "README.txt" in err, err
    summary = _strict((tmp_path / "o" / "composition.json").read_text())
    assert summary["faces"] == 30 and summary["skipped"]["error"] == 3

    only_bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"path": ["x.jpg"], "status": ["ok"],
                             "probabilities": pa.array([[1, 0]], pa.list_(pa.int64()))}), only_bad)
    code, out, err = run_cli("audit", "--from", only_bad, "--method", "count", "--out", tmp_path / "o2")
    assert code == 1 and "1 error" in err and "Traceback" not in err and not (tmp_path / "o2").exists()

    (tmp_path / "text.parquet").write_text("path,status\n")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(folder / "part-0.parquet", corrupt / "a.parquet")
    (corrupt / "b.parquet").write_bytes((folder / "part-0.parquet").read_bytes()[:-40])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("nothing\n")
    for bad, named in ((tmp_path / "text.parquet", "text.parquet"), (corrupt, "b.parquet"), (empty, "empty"),
                       (tmp_path / "missing.jsonl", "missing.jsonl"), (tmp_path / "p.txt", "p.txt")):
        code, out, err = run_cli("audit", "--from", bad, "--method", "count", "--out", tmp_path / "o3")
        assert code == 2 and named in err and "Traceback" not in err and out == "", (bad, err)
        assert not (tmp_path / "o3").exists()


# ---- item 7: a CSV of groups is read as predict reads it ---------------------------------------------------
def test_a_csv_of_groups_gets_the_usage_errors_predict_gives(tmp_path, faces):
    shutil.copy(faces[0], tmp_path / faces[0].name)
    listing = tmp_path / "list.csv"
    for content, phrase in (("file,campaign\n" + faces[0].name + ",\u00e9t\u00e9\n").encode("latin-1"), "not UTF-8"), \
                           ((f"file,campaign\n{faces[0].name}," + "x" * 200_000 + "\n").encode(), "not a CSV file"):
        listing.write_bytes(content)
        predicted = run_cli("predict", listing, "--workers", "1")
        audited = run_cli("audit", listing, "--by", "campaign", "--out", tmp_path / "o", "--workers", "1")
        for code, out, err in (predicted, audited):
            assert code == 2 and phrase in err and "list.csv" in err and "Traceback" not in err and out == "", err
        assert not (tmp_path / "o").exists()


# ---- item 8: names escaped for each medium ------------------------------------------------------------------
NAMES = ("big $$ spenders", "a$_$b", "x\n# hacked", "<script>alert(1)</script>", "\x1b[31mred", "| a | b |",
         "[link](http://evil)", "$\\frac{1}{0}$")


def test_names_are_escaped_for_plots_markdown_and_terminals(tmp_path):
    rows = [{**r, "group": name} for i, name in enumerate(NAMES) for r in _good_rows(5, seed=i, folder=f"f{i}")]
    source = _jsonl(tmp_path / "p.jsonl", [{**r, "campaign": r.pop("group")} for r in rows])
    code, out, err = run_cli("audit", "--from", source, "--by", "campaign", "--method", "count", "--out",
                             tmp_path / "o", "--replicates", "20")
    assert code == 0 and "Traceback" not in err and "\x1b" not in err, err
    folder = tmp_path / "o"
    assert (folder / "composition.png").stat().st_size > 1000
    report = (folder / "report.md").read_text()
    assert "<script>" not in report and "\x1b" not in report and "](http" not in report
    assert not any(line.startswith("# hacked") for line in report.splitlines())
    assert report.count("\n### ") == len(NAMES) + 1  # one heading per group and `all`, none made by a name
    groups = {r["group"] for r in _strict((folder / "composition.json").read_text())["rows"]}
    assert set(NAMES) <= groups  # the data files keep the names as they are


def test_a_plot_that_fails_loses_no_result(tmp_path, monkeypatch):
    def broken(self, path, **kwargs):
        raise ValueError("mathtext cannot parse this")
    monkeypatch.setattr(AuditResult, "plot", broken)
    with pytest.warns(UserWarning, match="composition.png could not be drawn"):
        facerace.audit(predictions=_jsonl(tmp_path / "p.jsonl", _good_rows(20)), method="count", replicates=20,
                       out=tmp_path / "o")
    for name in ("composition.csv", "composition.json", "report.md"):
        assert (tmp_path / "o" / name).stat().st_size > 0, name
    assert "could not be drawn" in (tmp_path / "o" / "report.md").read_text()


# ---- item 13: streamed statistics ---------------------------------------------------------------------------
def _mix(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(7, 0.6), n)


def test_streamed_statistics_give_the_intervals_of_the_rows():
    """Large groups are kept as sums (normal draws of the mean, multinomial label counts): their intervals match
    the bootstrap of the rows themselves; small groups keep their rows and resample them."""
    from conftest import synthetic_heldout

    held = synthetic_heldout()
    probs = _mix(20_000)
    stats = GroupStats(7)
    for first in range(0, len(probs), 4096):
        stats.add(probs[first:first + 4096])
    assert stats.rows is None and stats.n == 20_000  # nothing per face is kept
    for method in ("count", "probability", "pacc"):
        streamed = shares_of(stats, method, held, replicates=1000)
        rows = interval(bootstrap(probs, method, held, replicates=1000))
        assert np.abs(streamed.low - rows[0]).max() < 0.004 and np.abs(streamed.high - rows[1]).max() < 0.004, method
    small = _mix(300, seed=1)
    exact = GroupStats(7)
    exact.add(small[:100])
    exact.add(small[100:])
    assert exact.rows is not None and len(exact.rows) == 300 <= EXACT_FACES
    np.testing.assert_allclose(shares_of(exact, "pacc", held).estimate, shares(small, "pacc", held).estimate)


def test_em_on_a_large_group_uses_a_uniform_sample_and_says_so(monkeypatch):
    from conftest import synthetic_heldout

    from facerace import quantify

    monkeypatch.setattr(quantify, "EM_WORK", 200_000)  # em keeps 1,000 faces at 200 replicates (test speed)
    monkeypatch.setattr(quantify, "EXACT_FACES", 500)
    probs = _mix(3_000, seed=2)
    rows = [{"path": f"{i}.jpg", "status": "ok", "probabilities": dict(zip(CLASSES7, p))} for i, p in enumerate(probs)]
    result = composition(rows, model={"name": "m", "version": "1"}, model_scheme="fairface7",
                         heldout=synthetic_heldout(), method="em", replicates=200)
    assert em_sample(200) == 1_000
    assert any("uniform sample of 1,000" in w for w in result.warnings)
    full = shares(probs, "em", synthetic_heldout(), replicates=10)
    g = result.groups[0]
    assert g.faces == 3_000
    assert np.all(np.array(g.ci_low) - 0.01 <= full.estimate) and np.all(full.estimate <= np.array(g.ci_high) + 0.01)


# ---- item 14: bounded parameters, many groups ---------------------------------------------------------------
def test_replicates_are_bounded(tmp_path):
    source = _jsonl(tmp_path / "p.jsonl", _good_rows(10))
    for value in ("30000000", "0", str(MAX_REPLICATES + 1)):
        code, out, err = run_cli("audit", "--from", source, "--method", "count", "--replicates", value, "--out",
                                 tmp_path / "o")
        assert code == 2 and "replicates" in err and "Traceback" not in err and not (tmp_path / "o").exists(), err
    with pytest.raises(InvalidParameterError, match="replicates"):
        Tally(method="count", replicates=10**9)


def test_many_groups_are_fast_and_warned_about_once(tmp_path):
    import time

    from conftest import synthetic_heldout

    rows = [{"path": f"g{i}/{j}.jpg", "status": "ok", "probabilities": dict(zip(CLASSES7, p)), "group": f"g{i}"}
            for i in range(303) for j, p in enumerate(_mix(3, seed=i))]
    start = time.perf_counter()
    result = composition(rows, model={"name": "m", "version": "1"}, model_scheme="fairface7",
                         heldout=synthetic_heldout(), method="pacc", replicates=1000)
    assert time.perf_counter() - start < 60  # 303 groups took 160 s before
    small = [w for w in result.warnings if "fewer than 50 faces" in w]
    assert len(result.groups) == 304 and len(small) == 1 and "303 group(s)" in small[0] and "and 293 more" in small[0]


def test_groups_past_the_limit_are_pooled(monkeypatch):
    monkeypatch.setattr(audit_module, "MAX_GROUPS", 3)
    rows = [{"path": f"{i}.jpg", "status": "ok", "probabilities": dict(zip(CLASSES7, p)), "group": f"g{i % 6}"}
            for i, p in enumerate(_mix(60))]
    result = composition(rows, model={"name": "m", "version": "1"}, model_scheme="fairface7", method="count")
    names = [g.name for g in result.groups]
    assert OTHER_GROUPS in names and len(names) <= 5 and sum(g.faces for g in result.groups[1:]) == 60
    assert any("pooled" in w for w in result.warnings)


# ---- item 16: the default run folder -----------------------------------------------------------------------
def test_audit_without_out_writes_a_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = _jsonl(tmp_path / "p.jsonl", _good_rows(10))
    for n in (1, 2):
        code, out, err = run_cli("audit", "--from", source, "--method", "count", "--replicates", "20")
        assert code == 0 and f"runs/audit/exp{n}/report.md" in err, err
        assert (tmp_path / "runs" / "audit" / f"exp{n}" / "composition.csv").is_file()
    code, out, err = run_cli("audit", "--from", source, "--method", "count", "--out", "runs/audit/exp1")
    assert code == 2 and "omit it to get runs/audit/expN" in err


# ---- item 4: the audit folder appears complete, or not at all --------------------------------------------
def test_the_audit_folder_appears_complete_or_not_at_all(tmp_path, monkeypatch):
    good = _jsonl(tmp_path / "p.jsonl", _good_rows(20))
    bad = _jsonl(tmp_path / "bad.jsonl", _absurd())
    with pytest.raises(NoFaceFoundError):
        facerace.audit(predictions=bad, method="count", out=tmp_path / "runs" / "a")
    assert not (tmp_path / "runs" / "a").exists() and not list((tmp_path / "runs").iterdir())  # no partial folder

    real = Tally.result

    def another_run_meanwhile(self, model):
        (tmp_path / "runs" / "b").mkdir()
        (tmp_path / "runs" / "b" / "composition.csv").write_text("the other run's\n")
        return real(self, model)

    monkeypatch.setattr(Tally, "result", another_run_meanwhile)
    with pytest.raises(InvalidParameterError, match="filled by another run") as info:
        facerace.audit(predictions=good, method="count", replicates=20, out=tmp_path / "runs" / "b")
    assert (tmp_path / "runs" / "b" / "composition.csv").read_text() == "the other run's\n"
    kept = [p for p in (tmp_path / "runs").iterdir() if p.name.endswith(".partial")]
    assert len(kept) == 1 and str(kept[0]) in str(info.value) and (kept[0] / "composition.json").is_file()

    def interrupted(self, batch, groups=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(Tally, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        facerace.audit(predictions=good, method="count", out=tmp_path / "runs" / "c")
    assert not (tmp_path / "runs" / "c").exists()
    assert [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(".c.")] == []


def test_an_interrupted_audit_of_images_keeps_its_rows(tmp_path, faces, monkeypatch, model_with_heldout):
    for face in faces[:3]:
        shutil.copy(face, tmp_path / face.name)
    calls = []
    real = Tally.add

    def stop_after_rows(self, batch, groups=None):
        real(self, batch, groups)
        calls.append(len(batch))
        raise KeyboardInterrupt
    monkeypatch.setattr(Tally, "add", stop_after_rows)
    with pytest.raises(KeyboardInterrupt):
        facerace.audit(tmp_path, out=tmp_path / "out", model=model_with_heldout, engine=Engine(workers=1), quiet=True)
    kept = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert calls and not (tmp_path / "out").exists() and len(kept) == 1
    assert len((kept[0] / "faces.jsonl").read_text().splitlines()) >= 3
