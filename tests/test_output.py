"""Safe output and a consistent command line: CSV cells a spreadsheet will not run, terminal text
without control characters, unique annotated pictures, the format from -o's extension, a quiet
exit when the reader of stdout goes away, a table that keeps its columns, every verb's options."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_labels
from conftest import run_cli as run
from PIL import Image

from facerace.apps import cli
from facerace.apps.output import TABLE_COLUMNS, table_line
from facerace.results import LANDMARK_NAMES, ROW_KEYS
from facerace.textout import CsvWriter, csv_cell, display_width, printable, progress_bar

SRC = Path(__file__).resolve().parents[1] / "src" / "facerace"
HOSTILE = ["=HYPERLINK(\"evil.example\",\"y\")", "+1+1", "@SUM(1)", "-2+3", "\tTAB", "\rCR"]


def _not_an_image(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(b"not an image")
    return path


# ---- CSV injection ---------------------------------------------------------------------------
def test_csv_cell_neutralises_formulas_and_keeps_numbers():
    for text in HOSTILE:
        assert csv_cell(text) == "'" + text
    assert [csv_cell(v) for v in ("a.jpg", "White", 0.25, -3, None, True)] == ["a.jpg", "White", 0.25, -3, None, True]
    assert csv_cell(Path("-1+2.jpg")) == "'-1+2.jpg" and csv_cell(np.int64(-3)) == -3  # paths are text, numpy numbers


def test_predict_csv_cells_cannot_run_in_a_spreadsheet(faces, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths, so the cells start with the hostile characters
    names = [_not_an_image(tmp_path, name + ".jpg").name for name in HOSTILE[:4]]
    shutil.copy(faces[0], tmp_path / "-face.jpg")
    code, _, _ = run("predict", "-o", "rows.csv", "--workers", "1", "--", *names, "-face.jpg")
    assert code == 0
    header, *rows = list(csv.reader(open("rows.csv", newline="")))
    assert [r[0] for r in rows] == ["'" + n for n in [*names, "-face.jpg"]]
    assert not [c for row in rows for c in row if c.startswith(("=", "+", "@", "\t", "\r", "-"))]
    face = rows[-1]
    assert face[2] == "ok" and 0 < float(face[header.index("confidence")]) <= 1  # numbers stay numbers


def test_evaluate_predictions_csv_cannot_run_in_a_spreadsheet(faces, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = ["path,label"]
    for i, (src, row) in enumerate(zip(faces, fixture_labels())):
        shutil.copy(src, tmp_path / f"{HOSTILE[i % 4]}{i}.jpg")
        lines.append(f'"{HOSTILE[i % 4].replace(chr(34), chr(34) * 2)}{i}.jpg",{row["race"]}')
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    code, _, err = run("evaluate", "--data", "csv:labels.csv", "-o", "run", "--cache-dir", "cache", "--workers", "1",
                       "--quiet")
    assert code == 0, err
    rows = list(csv.DictReader(open("run/predictions.csv", newline="")))
    assert len(rows) == len(faces) and all(r["path"].startswith("'") for r in rows)
    assert all(0 < float(r["confidence"]) <= 1 for r in rows)


def test_every_csv_is_written_through_the_one_safe_writer():
    """csv.writer / DictWriter appear only in textout.py: every CSV facerace writes neutralises formulas."""
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name != "textout.py"
                 and ("csv.writer(" in p.read_text() or "DictWriter(" in p.read_text())]
    assert not offenders


def test_csv_writer_neutralises_every_string_cell():
    out = io.StringIO()
    CsvWriter(out).writerow(["=1+1", 2.5, "-x", "fine"])
    named = CsvWriter(out, fieldnames=("a", "b"))
    named.writeheader()
    named.writerow({"b": "@cmd", "a": -1})
    assert list(csv.reader(io.StringIO(out.getvalue()))) == [
        ["'=1+1", "2.5", "'-x", "fine"], ["a", "b"], ["-1", "'@cmd"]]


# ---- control characters ----------------------------------------------------------------------
def test_printable_escapes_control_characters_and_keeps_text():
    assert printable("a\x1b[31mred\rb\x08\x07\u202egpj.exe") == "a\\x1b[31mred\\rb\\x08\\x07\\u202egpj.exe"
    assert printable("caf\u00e9 \u5199\u771f.jpg") == "caf\u00e9 \u5199\u771f.jpg"
    assert printable("line\nnext", keep_newlines=True) == "line\nnext" and printable("a\nb") == "a\\nb"
    assert printable(os.fsdecode(b"bad\xff.jpg")) == "bad\\xff.jpg"  # a file name that is not UTF-8


def test_file_names_reach_the_terminal_escaped_and_json_stays_exact(tmp_path):
    name = _not_an_image(tmp_path, "x\x1b]0;pwned\x07\rfake.jpg")
    code, out, _ = run("predict", name, "--format", "table", "--workers", "1")
    assert code == 0 and "\x1b" not in out and "\r" not in out and "\\x1b]0;pwned\\x07\\rfake.jpg" in out
    code, out, _ = run("predict", name, "--format", "jsonl", "--workers", "1")
    assert json.loads(out)["path"] == str(name)  # JSON keeps the exact name (escaped by JSON itself)
    code, _, err = run("predict", tmp_path / "missing\x1b[2J.jpg")
    assert code == 2 and "\x1b" not in err and "missing\\x1b[2J.jpg" in err


# ---- --annotate ------------------------------------------------------------------------------
def test_annotate_keeps_every_picture_apart_with_its_extension(faces, tmp_path):
    inputs = tmp_path / "in"
    for rel, src in [("a/x.jpg", faces[0]), ("a/x.png", faces[1]), ("a__b/c.jpg", faces[2]), ("a/b__c.jpg", faces[3])]:
        (inputs / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.open(src).save(inputs / rel)
    out = tmp_path / "drawn"
    code, _, err = run("predict", inputs, "--annotate", out, "-o", tmp_path / "rows.jsonl", "--workers", "1")
    assert code == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a/b__c.jpg", "a/x.jpg", "a/x.png", "a__b/c.jpg"]
    assert Image.open(out / "a/x.png").format == "PNG" and Image.open(out / "a/x.jpg").format == "JPEG"
    assert "4 annotated picture(s) in" in err and str(out) in err


def test_annotate_refuses_to_overwrite_an_input(faces, tmp_path):
    shutil.copy(faces[0], tmp_path / "x.jpg")
    before = (tmp_path / "x.jpg").read_bytes()
    code, _, err = run("predict", tmp_path, "--annotate", tmp_path, "--workers", "1")
    assert code == 2 and "overwrite" in err and (tmp_path / "x.jpg").read_bytes() == before


# ---- output format ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, check", [
    ("faces.csv", lambda text: text.startswith("path,face,status,x,y,w,h,")),
    ("faces.json", lambda text: isinstance(json.loads(text), list)),
    ("faces.jsonl", lambda text: json.loads(text.splitlines()[0])["status"] == "error"),
    ("faces.txt", lambda text: text.startswith("path ")),
])
def test_the_output_format_follows_the_extension(tmp_path, name, check):
    bad = _not_an_image(tmp_path, "bad.jpg")
    code, _, _ = run("predict", bad, "-o", tmp_path / name, "--workers", "1")
    assert code == 0 and check((tmp_path / name).read_text())


def test_an_unknown_extension_needs_format(tmp_path):
    bad = _not_an_image(tmp_path, "bad.jpg")
    code, _, err = run("predict", bad, "-o", tmp_path / "faces.xlsx")
    assert code == 2 and "--format" in err and not (tmp_path / "faces.xlsx").exists()
    code, _, _ = run("predict", bad, "-o", tmp_path / "faces.xlsx", "--format", "csv", "--workers", "1")
    assert code == 0 and (tmp_path / "faces.xlsx").read_text().startswith("path,")


def test_embed_refuses_an_output_numpy_would_rename(tmp_path):
    code, _, err = run("embed", _not_an_image(tmp_path, "bad.jpg"), "-o", tmp_path / "faces.csv")
    assert code == 2 and ".npz" in err and not list(tmp_path.glob("faces*"))


# ---- a closed stdout -------------------------------------------------------------------------
class _ClosedAfterOneLine(io.StringIO):
    def write(self, text: str) -> int:
        if "\n" in self.getvalue():
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_a_reader_that_goes_away_ends_the_run_quietly(tmp_path, monkeypatch):
    files = [_not_an_image(tmp_path, f"{i}.jpg") for i in range(5)]
    monkeypatch.setattr(sys, "stdout", _ClosedAfterOneLine())
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert cli.main(["predict", *map(str, files), "--format", "jsonl", "--workers", "1"]) == 141
    assert err.getvalue() == ""


def test_predict_into_a_closed_pipe_exits_141_without_a_traceback(tmp_path):
    files = [_not_an_image(tmp_path, f"{i}.jpg") for i in range(3)]
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    read, write = os.pipe()
    os.close(read)  # like `| head -1` after its line: every write fails
    proc = subprocess.run([sys.executable, "-m", "facerace", "predict", *map(str, files), "--workers", "1"],
                          stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == ""


# ---- the table -------------------------------------------------------------------------------
def test_table_columns_hold_on_error_rows_long_paths_and_wide_names():
    base = dict.fromkeys(ROW_KEYS)
    rows = [
        {**base, "path": "short.jpg", "face": 0, "status": "ok", "box": [1, 2, 30, 40], "label": "Middle Eastern",
         "confidence": 0.51, "uncertain": False},
        {**base, "path": "x/" * 40 + "long.jpg", "status": "error", "error": "cannot identify image file " * 10},
        {**base, "path": "\u5199\u771f" * 30 + ".jpg", "status": "no_face"},
        {**base, "path": "e.jpg", "status": "error", "error": "bad\nline\x1b[2J"},
    ]
    lines = [table_line(r) for r in rows]
    start = sum(w + 1 for _, w in TABLE_COLUMNS[:2])  # where the status column starts
    for line, row in zip(lines, rows):
        assert "\n" not in line and "\x1b" not in line
        at = line.index(f" {row['status']}") + 1
        assert display_width(line[:at]) == start  # in terminal columns: wide characters count twice
    assert lines[1].rstrip().endswith("…") and "long.jpg" in lines[1]


# ---- every verb, the same way ----------------------------------------------------------------
def _verbs() -> dict[str, argparse.ArgumentParser]:
    def walk(parser: argparse.ArgumentParser, prefix: str):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield prefix, parser
        for action in subs:
            for name, sub in action.choices.items():
                yield from walk(sub, f"{prefix} {name}".strip())
    return dict(walk(cli._parser(), ""))


def test_every_option_of_every_verb_has_help_and_shows_its_default():
    missing, no_default = [], []
    for verb, parser in _verbs().items():
        shown = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS and action.dest == "out":
                continue  # -h, and the hidden --out alias
            if not action.help:
                missing.append(f"{verb} {'/'.join(action.option_strings) or action.dest}")
            elif action.option_strings and action.default not in (None, False) and \
                    str(action.default) not in shown:
                no_default.append(f"{verb} {action.option_strings[0]} (default {action.default!r})")
    assert not missing, "options without help: " + ", ".join(missing)
    assert not no_default, "defaults not in --help: " + ", ".join(no_default)


def test_every_verb_is_quiet_on_request_and_writers_take_o_output():
    verbs = _verbs()
    assert [v for v, p in verbs.items() if "--quiet" not in p._option_string_actions] == []
    for verb in ("predict", "embed", "train", "evaluate", "export", "stream"):
        assert {"-o", "--output"} <= set(verbs[verb]._option_string_actions), verb
    for verb in ("train", "evaluate"):  # the old spelling still works
        parser = verbs[verb]
        base = ["--data", "fairface:d"]
        assert parser.parse_args([*base, "--out", "r"]).out == parser.parse_args([*base, "-o", "r"]).out == Path("r")


def test_progress_bars_only_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_bar(range(3)).disable
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not progress_bar(range(3)).disable and progress_bar(range(3), quiet=True).disable


def test_no_progress_bar_bypasses_the_one_helper():
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name != "textout.py"
                 and "tqdm" in p.read_text()]
    assert not offenders


# ---- landmarks and the detector's score ------------------------------------------------------
def test_rows_name_the_landmarks_and_give_the_detector_score(faces, tmp_path):
    code, out, _ = run("predict", faces[0], "--format", "jsonl", "--workers", "1")
    row = json.loads(out)
    assert code == 0 and tuple(row) == ROW_KEYS and tuple(row["landmarks"]) == LANDMARK_NAMES
    assert 0 < row["detection_score"] <= 1
    marks = row["landmarks"]
    # the person's own left and right: a face looking at the camera has its right eye on the picture's left
    assert marks["right_eye"][0] < marks["nose"][0] < marks["left_eye"][0]
    assert marks["mouth_right"][0] < marks["mouth_left"][0] and marks["nose"][1] < marks["mouth_left"][1]
    x, y, w, h = row["box"]
    assert all(x <= px <= x + w and y <= py <= y + h for px, py in marks.values())
    code, _, _ = run("predict", faces[0], "-o", tmp_path / "f.csv", "--workers", "1")
    flat = next(csv.DictReader((tmp_path / "f.csv").open()))
    assert float(flat["nose_x"]) == marks["nose"][0] and float(flat["detection_score"]) == row["detection_score"]
