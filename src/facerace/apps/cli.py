"""The `facerace` command: one subcommand per verb, each a thin call into the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from facerace.errors import DatasetError, FaceraceError, InvalidParameterError, ModelNotFoundError
from facerace.textout import json_text, printable

#: --model: the shipped models (facerace.model.SHIPPED; `facerace models` lists them with their accuracy) or a folder.
MODEL_HELP = ("shipped model: default (dlib + SFace networks) or fast (dlib alone: about twice the speed, a few "
              "points less accurate; see `facerace models`), or a model/run folder (default: default)")

if TYPE_CHECKING:
    from facerace.apps.output import RowWriter
    from facerace.apps.tables import ParquetRowWriter
    from facerace.head import HeadParams
    from facerace.predictor import Predictor
    from facerace.results import ImageResult
    from facerace.training.config import TrainConfig

USAGE_ERRORS = (InvalidParameterError, DatasetError, ModelNotFoundError)
#: What Ctrl-C keeps, per verb, where the verb's own message does not say (predict and embed count the images).
_CACHED = "the embeddings computed so far are kept in the cache: the same command continues from them"
INTERRUPTED = {"train": _CACHED, "evaluate": _CACHED, "serve": "the server stopped",
               "stream": "stopped; the rows and video written so far are kept",
               "audit": "if per-face rows were computed, the line above says where they are kept",
               "label": "the labelling page stopped; every answer given is saved in labels.csv"}


class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default after its help unless the help already says it (or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _backbone(value: str) -> str:
    """A registered network, or several joined by "+" (fused)."""
    from facerace.backbones import split_backbones

    try:
        split_backbones(value)
    except InvalidParameterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _flips(value: str) -> bool | tuple[bool, ...]:
    """"on" or "off" for every network; "on,off": one mirror-averaging setting per network of a fused backbone."""
    words = {"on": True, "off": False}
    flips = [words.get(w.strip().lower()) for w in value.split(",")]
    if None in flips:
        raise argparse.ArgumentTypeError(f"expected on or off, or one per network comma-separated (e.g. on,off), "
                                         f"got {value!r}")
    return flips[0] if len(flips) == 1 else tuple(flips)


def _parser() -> argparse.ArgumentParser:
    from facerace.apps.output import FORMATS
    from facerace.backbones import BACKBONES
    from facerace.detect import DETECTORS
    from facerace.faces import MAX_FACES, MIN_FACE
    from facerace.head import HeadParams
    from facerace.labels import SCHEMES
    from facerace.apps.audit import AUDIT_METHODS
    from facerace.quantify import ADJUSTED, MAX_REPLICATES
    from facerace.training.config import TrainConfig
    from facerace.version import __version__

    p = argparse.ArgumentParser(prog="facerace", description="Perceived race category of every face in photos.")
    p.add_argument("--version", action="version", version=f"facerace {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pr = sub.add_parser("predict", help="find every face and predict its race category")
    pr.add_argument("paths", nargs="+", metavar="PATH", help="image, folder (recursive), glob or CSV of paths")
    pr.add_argument("--format", choices=FORMATS, help="output format (default: from the --output file's extension "
                    ".csv .jsonl .json .txt .parquet; else a table on a terminal and jsonl otherwise; parquet with "
                    "--engine ray)")
    pr.add_argument("--output", "-o", help="write rows to this file instead of stdout (parquet: a new folder, local "
                                           "or s3:// / gs://)")
    pr.add_argument("--annotate", type=Path, metavar="DIR",
                    help="save copies with boxes and labels drawn here, in the inputs' folder structure")
    pr.add_argument("--scheme", help=f"label scheme: {', '.join(SCHEMES)} (default: the model's)")
    pr.add_argument("--detector", help=f"face detector: {', '.join(DETECTORS)} (default: the model's)")
    pr.add_argument("--threshold", type=float,
                    help="confidence below which a face is uncertain (default: the model's, for the scheme)")
    pr.add_argument("--model", default="default", help=MODEL_HELP)
    pr.add_argument("--column", help="CSV column holding paths (default: path or file)")
    pr.add_argument("--root", type=Path, help="folder CSV paths must stay inside (default: the CSV's folder)")
    pr.add_argument("--min-face", type=int, default=MIN_FACE, help="smaller faces (px) are reported, not classified")
    pr.add_argument("--max-faces", type=int, default=MAX_FACES,
                    help="faces classified per image, the largest; the others are reported as too_many")
    pr.add_argument("--workers", type=int, help="processes for many files (default: all cores); --engine ray: "
                                                "actors (default: the cluster's CPUs)")
    _engine(pr)

    em = sub.add_parser("embed", help="write one face embedding (descriptor) per face to an .npz file")
    em.add_argument("paths", nargs="+", metavar="PATH", help="image, folder (recursive), glob or CSV of paths")
    em.add_argument("--output", "-o", required=True, help="the .npz file to write (parquet: a new folder, local or "
                                                          "s3:// / gs://)")
    em.add_argument("--format", choices=("npz", "parquet"), help="npz (default) or parquet (default with --engine ray)")
    em.add_argument("--backbone", type=_backbone, help=f"face network: {', '.join(BACKBONES)}, or several joined "
                                                      "by + (embeddings concatenated) (default: the model's)")
    em.add_argument("--backbone-weights", help="the backbone's weights file where it needs one (vggface: vgg_face_weights.h5)")
    em.add_argument("--detector", help=f"face detector: {', '.join(DETECTORS)} (default: the model's)")
    em.add_argument("--model", default="default", help="model whose detector and backbone are the defaults")
    em.add_argument("--column", help="CSV column holding paths (default: path or file)")
    em.add_argument("--root", type=Path, help="folder CSV paths must stay inside (default: the CSV's folder)")
    em.add_argument("--min-face", type=int, default=MIN_FACE, help="smaller faces (px) are skipped")
    em.add_argument("--max-faces", type=int, default=MAX_FACES, help="faces embedded per image, the largest")
    _engine(em)

    tr = sub.add_parser("train", help="train a classifier (a head, or fine-tune the network's last layers)")
    _train_options(tr, TrainConfig(), HeadParams())
    _common(tr)

    ex = sub.add_parser("export", help="write a model as one ONNX file: face chips -> probabilities")
    ex.add_argument("--model", default="default", help=MODEL_HELP)
    ex.add_argument("--output", "-o", type=Path, required=True, help="the .onnx file to write")

    ev = sub.add_parser("evaluate", help="score a model on a labelled dataset split")
    ev.add_argument("--model", default="default", help=MODEL_HELP)
    ev.add_argument("--data", required=True, metavar="KIND:PATH",
                    help="labelled dataset, e.g. fairface:data/fairface, utkface:data/UTKFace or csv:labels.csv")
    ev.add_argument("--split", default="val", help="dataset split (default val; utkface has one: all)")
    ev.add_argument("--scheme", help="scheme to score in (default: finest both label sets map onto)")
    _run_folder(ev, "runs/evaluate/expN")
    _data_columns(ev)
    _common(ev)

    au = sub.add_parser("audit", help="the composition of a photo collection per group, with adjusted estimates "
                                      "and 95%% intervals")
    au.add_argument("paths", nargs="*", metavar="PATH", help="image, folder (recursive), glob or CSV of paths")
    au.add_argument("--out", "-o", type=Path, metavar="DIR",
                    help="new folder for composition.csv/.json/.png, faces.jsonl and report.md "
                         "(default runs/audit/expN)")
    au.add_argument("--by", default="none", help="group by: none (default), folder (the folder holding each "
                                                 "image) or a column of the input CSVs / the --from file")
    au.add_argument("--scheme", help=f"label scheme: {', '.join(SCHEMES)} (default: the model's)")
    au.add_argument("--model", default="default", help=MODEL_HELP)
    au.add_argument("--method", choices=AUDIT_METHODS,
                    help=f"validated (the default with --labels: the labelled sample corrects the model), adjusted "
                         f"(the default without; = {ADJUSTED}), pacc, em, count (share of predicted labels) or "
                         "probability (mean probability); see docs")
    au.add_argument("--labels", type=Path, metavar="FILE",
                    help="CSV of path,label[,face] for a uniform random sample of the audited faces (paths relative "
                         "to the CSV's folder, or absolute; labels of the audit's scheme or a finer one): the "
                         "estimate then holds on this collection however its photos differ from the training ones")
    au.add_argument("--sample", type=int, metavar="N",
                    help="draw N faces per group uniformly at random (seeded) to label: sample.csv and the faces' "
                         "crops in --out; label them with `facerace label DIR`, then re-run with --labels. It must "
                         "be a uniform random sample: hand-picked or skipped faces break the estimate's guarantee")
    au.add_argument("--detector", help=f"face detector: {', '.join(DETECTORS)} (default: the model's)")
    au.add_argument("--from", dest="predictions", type=Path, metavar="FILE",
                    help="per-face rows of an earlier `facerace predict` run with this --model (.jsonl, .csv, "
                         ".parquet file or Parquet folder) instead of PATHs")
    au.add_argument("--column", help="CSV column holding paths (default: path or file); they must stay inside "
                                     "the CSV's folder")
    au.add_argument("--replicates", type=int, default=1000,
                    help=f"bootstrap replicates per interval, 1 to {MAX_REPLICATES:,} (default 1000)")
    _engine(au)
    au.add_argument("--workers", type=int, help="processes for many files (default: all cores)")

    sub.add_parser("models", help="list the shipped models")

    st = sub.add_parser("stream", help="label faces live in a webcam, video file or stream URL")
    st.add_argument("--source", default="0", help="webcam index, video file or URL (default 0)")
    st.add_argument("--output", "-o", type=Path,
                    help="write the annotated video (.mp4, .avi, .mkv, .mov: boxes, labels, track ids) or the rows "
                         "(.jsonl) to this file")
    st.add_argument("--format", choices=("jsonl",), help="write one row per frame and track (frame, time_s, track, "
                    "status, box, label, confidence, uncertain) to stdout, or to -o FILE.jsonl; the default "
                    "without a video -o or --display")
    st.add_argument("--display", action=argparse.BooleanOptionalAction, default=False,
                    help="show a window (needs a screen; default off)")
    st.add_argument("--classify-every", type=int, default=5, help="re-classify each face every N frames")
    st.add_argument("--smooth", type=int, default=10, help="average a face's last N classifications")
    st.add_argument("--max-frames", type=int, help="stop after this many frames")
    st.add_argument("--model", default="default", help=MODEL_HELP)
    st.add_argument("--scheme", help="label scheme (default: the model's)")
    st.add_argument("--detector", help="face detector (default: the model's)")
    st.add_argument("--threshold", type=float,
                    help="confidence below which a face is uncertain (default: the model's, for the scheme)")

    lb = sub.add_parser("label", help="label an audit's sample (from --sample) face by face in a local web page")
    lb.add_argument("folder", type=Path, metavar="OUT_DIR", help="the audit folder holding sample.csv; answers go to "
                                                                 "labels.csv there, saved after each one")
    lb.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    lb.add_argument("--port", type=int, default=8765, help="TCP port to listen on")
    lb.add_argument("--scheme", help=f"classes to choose from: {', '.join(SCHEMES)} (default: the audit's)")

    sv = sub.add_parser("serve", help="run the HTTP API and web page")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (0.0.0.0: every network interface; see README 'Safety and limits' first)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    sv.add_argument("--workers", type=int, default=1, help="server processes, each with its own model")
    sv.add_argument("--model", default="default", help=MODEL_HELP)
    sv.add_argument("--max-upload-mb", type=float, default=10.0, help="larger uploads get 413")
    sv.add_argument("--timeout", type=float, default=30.0, help="seconds of analysis before a request gets 504")
    sv.add_argument("--header-timeout", type=float, default=10.0,
                    help="seconds a client may take to send a request's headers before it is disconnected")
    sv.add_argument("--body-timeout", type=float, default=60.0,
                    help="seconds a client may take to send a request's body before it gets 408")
    sv.add_argument("--max-connections", type=int, default=64,
                    help="open connections per server process; more get 503")

    ds = sub.add_parser("datasets", help="inspect datasets")
    ds_sub = ds.add_subparsers(dest="action", required=True, metavar="ACTION")
    ck = ds_sub.add_parser("check", help="count images per class, gender and age; list every bad file")
    ck.add_argument("data", metavar="KIND:PATH", help="e.g. fairface:data/fairface, utkface:data/UTKFace")
    ck.add_argument("--path-column", default="path", help="csv: datasets: the column of image paths")
    ck.add_argument("--label-column", default="label", help="csv: datasets: the column of labels")
    ck.add_argument("--strict", action="store_true",
                    help="exit 1 when any problem is listed (default: exit 0 once the check has run)")
    _finish(p)
    return p


def _finish(parser: argparse.ArgumentParser) -> None:
    """Give every verb (sub-parsers included) the same help layout, defaults shown, and `--quiet`."""
    parser.formatter_class = _HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb in action.choices.values():
                if not verb._subparsers and "--quiet" not in verb._option_string_actions:
                    verb.add_argument("--quiet", "-q", action="store_true",
                                      help="no progress bars or notes on stderr (results and errors still appear)")
                _finish(verb)


def _run_folder(p: argparse.ArgumentParser, default: str) -> None:
    """`-o/--output RUN`: the run folder to create; `--out` is kept as a hidden alias."""
    p.add_argument("--output", "-o", dest="out", type=Path, metavar="RUN",
                   help=f"run folder to create (default {default})")
    p.add_argument("--out", dest="out", type=Path, help=argparse.SUPPRESS)


def _train_options(p: argparse.ArgumentParser, config: TrainConfig, head: HeadParams) -> None:
    """The train verb's options: one per TrainConfig / HeadParams field, unset ones keep the dataclass defaults."""
    from facerace.backbones import BACKBONES, fine_tunable
    from facerace.detect import DETECTORS
    from facerace.training.config import BALANCE

    p.add_argument("--data", action="append", metavar="KIND:PATH",
                   help="dataset, e.g. fairface:data/fairface or utkface:data/UTKFace (repeatable)")
    p.add_argument("--scheme", help=f"label scheme to train (default {config.scheme})")
    _run_folder(p, "runs/train/expN")
    p.add_argument("--split", help=f"dataset split to train on (default {config.split})")
    p.add_argument("--val-fraction", type=float, help=f"held-out validation share (default {config.val_fraction})")
    p.add_argument("--seed", type=int, help=f"seed of the split, the head and fine-tuning (default {config.seed})")
    p.add_argument("--hidden", type=int, help=f"hidden units of the head; 0 = linear (default {head.hidden})")
    p.add_argument("--learning-rate", type=float, help=f"Adam step size (default {head.learning_rate})")
    p.add_argument("--weight-decay", type=float, help=f"L2 penalty (default {head.weight_decay})")
    p.add_argument("--dropout", type=float, help=f"dropout on the hidden layer (default {head.dropout})")
    p.add_argument("--batch-size", type=int, help=f"examples per step (default {head.batch_size})")
    frozen, tuned = head.resolved(), head.resolved(fine_tuning=True)
    p.add_argument("--patience", type=int, help=f"epochs without improvement before stopping (default "
                                                f"{frozen.patience}; {tuned.patience} with --unfreeze)")
    p.add_argument("--max-epochs", type=int, help=f"default {frozen.max_epochs}; {tuned.max_epochs} with --unfreeze")
    p.add_argument("--detector", choices=DETECTORS, help=f"face detector (default {config.detector})")
    p.add_argument("--backbone", type=_backbone,
                   help=f"face network: {', '.join(BACKBONES)}, or several joined by + whose embeddings are "
                        f"concatenated, e.g. dlib-resnet-v1-onnx+sface (default {config.backbone}; "
                        f"to fine-tune: {' or '.join(fine_tunable())})")
    p.add_argument("--backbone-weights", help="the backbone's weights file where it needs one (vggface: vgg_face_weights.h5)")
    p.add_argument("--unfreeze", type=int, metavar="N",
                   help="fine-tune the network's last N units with the head (dlib-torch: 1 = its fc layer, "
                        "2-15 also residual blocks, 16 all; vggface: 1-15 of conv1_1..fc7); default 0 = frozen")
    p.add_argument("--views", type=int, help=f"views per image when fine-tuning: the face, its mirror and random "
                                             f"augmentations (default {config.views})")
    p.add_argument("--backbone-learning-rate", type=float,
                   help=f"step size for the unfrozen layers (default {config.backbone_learning_rate})")
    p.add_argument("--threshold-target", type=float, help=f"held-out accuracy that sets the uncertainty threshold "
                                                          f"(default {config.threshold_target})")
    p.add_argument("--balance", choices=BALANCE,
                   help=f"weigh training faces so that each class (race) or each class x gender group counts "
                        f"equally in the loss and early stopping (default {config.balance})")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue an interrupted run folder with its settings")
    p.add_argument("--flip-average", nargs="?", const=True, type=_flips, metavar="on,off",
                   help="embed each face as the mean of it and its mirror image, in training and prediction "
                        f"(default {'on' if config.flip_average else 'off'}); a fused backbone takes one on/off "
                        "per network, in its order (e.g. on,off)")
    p.add_argument("--no-flip-average", dest="flip_average", action="store_false", default=None,
                   help="no mirror averaging")
    p.add_argument("--path-column", help=f"csv: datasets: the column of image paths (default {config.path_column})")
    p.add_argument("--label-column", help=f"csv: datasets: the column of labels (default {config.label_column})")


def _data_columns(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path-column", default="path", help="csv: datasets: the column of image paths")
    p.add_argument("--label-column", default="label", help="csv: datasets: the column of labels")


def _engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this machine; ray: a Ray cluster, rows written as Parquet (docs/SCALING.md)")
    p.add_argument("--ray-address", metavar="ADDRESS", help="--engine ray: auto, HOST:PORT or ray://HOST:PORT of a "
                                                            "running cluster (default: start Ray on this machine)")


def _engine_is_ray(args: argparse.Namespace) -> bool:
    if args.ray_address and args.engine != "ray":
        raise InvalidParameterError("--ray-address needs --engine ray")
    return args.engine == "ray"


def _ray(args: argparse.Namespace, predictor: Predictor) -> int:
    """Run `args.command` on Ray (after refusing the options only the local engine has) and print its summary."""
    from facerace.apps.ray_engine import run

    if args.format not in (None, "parquet"):
        raise InvalidParameterError(f"--engine ray writes Parquet, not {args.format}: drop --format")
    if getattr(args, "annotate", None):
        raise InvalidParameterError("--annotate needs --engine local")
    if not args.output:
        raise InvalidParameterError("--engine ray needs --output FOLDER (a new folder, local or s3:// / gs://)")
    summary = run(args.command, args.paths, args.output, predictor, ray_address=args.ray_address,
                  workers=getattr(args, "workers", None), column=args.column,
                  root=str(args.root) if args.root else None, quiet=args.quiet)
    _say(summary.line(), quiet=args.quiet)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, help="embedding cache folder (default $FACERACE_CACHE or ~/.cache/facerace)")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; exit status 0 done, 1 failed, 2 usage error, 130 Ctrl-C, 141 stdout closed early."""
    args = _parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is written escaped, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    _print_warnings(args.command)
    try:
        verbs = {"predict": _predict, "train": _train, "evaluate": _evaluate, "models": _models, "datasets": _datasets,
                 "serve": _serve, "stream": _stream, "label": _label,
                 "embed": _embed, "export": _export, "audit": _audit}
        return verbs[args.command](args)
    except USAGE_ERRORS as exc:
        _say(f"facerace {args.command}: error: {exc}")
        return 2
    except FaceraceError as exc:
        _say(f"facerace {args.command}: error: {exc}")
        return 1
    except BrokenPipeError:  # the reader went away (`facerace predict DIR | head -1`): stop quietly, as cat does
        _discard_stdout()
        return 141
    except OSError as exc:  # an output file that cannot be written, a full disk, ...
        _say(f"facerace {args.command}: error: {exc}")
        return 1
    except KeyboardInterrupt as exc:
        _say(f"facerace {args.command}: interrupted: {str(exc) or INTERRUPTED.get(args.command, 'nothing was written')}")
        return 130


def _say(text: str, *, quiet: bool = False) -> None:
    """A message for the person at the terminal, on stderr, control characters of file names escaped."""
    if not quiet:
        print(printable(text, keep_newlines=True), file=sys.stderr)


def _print_warnings(command: str) -> None:
    """Print facerace's own warnings, each time and even with --quiet, as `facerace VERB: warning: ...`
    (other warnings as Python prints them)."""
    import warnings

    from facerace.errors import FaceraceWarning

    default = getattr(warnings.showwarning, "python_default", warnings.showwarning)

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FaceraceWarning):
            _say(f"facerace {command}: warning: {message}")
        else:
            default(message, category, filename, lineno, file, line)

    show.python_default = default
    warnings.simplefilter("always", FaceraceWarning)
    warnings.showwarning = show


def _show(text: str) -> None:
    """A human-readable result on stdout (summaries, reports), control characters of file names escaped."""
    print(printable(text, keep_newlines=True))


def _discard_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush into the closed pipe stays silent."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (tests' StringIO)
        pass


def _predict(args: argparse.Namespace) -> int:
    from contextlib import ExitStack, closing

    from facerace.apps.draw import annotation_paths
    from facerace.apps.output import RowWriter, output_format
    from facerace.apps.sources import check_output, expand
    from facerace.files import atomic_output
    from facerace.predictor import Predictor
    from facerace.results import ImageResult
    from facerace.textout import progress_bar

    predictor = Predictor(args.model, scheme=args.scheme, detector=args.detector, threshold=args.threshold,
                          min_face=args.min_face, max_faces=args.max_faces)
    predictor.validate()  # model, scheme, detector and threshold, before any work
    if _engine_is_ray(args):
        return _ray(args, predictor)
    output = Path(args.output) if args.output else None
    fmt = output_format(args.format, output, sys.stdout.isatty())
    sources = expand(args.paths, column=args.column, root=args.root, quiet=args.quiet)
    good = [s.path for s in sources if s.error is None]
    check_output(args.output, [*args.paths, *good])
    pictures = annotation_paths(good, args.annotate) if args.annotate else {}
    drawn = done = 0
    with ExitStack() as stack:  # on any exit the rows written so far are finished and renamed into place
        if fmt == "parquet":
            from facerace.apps.tables import ParquetRowWriter, predict_schema

            if output is None:
                raise InvalidParameterError("--format parquet needs --output FOLDER (a new folder)")
            writer: RowWriter | ParquetRowWriter = ParquetRowWriter(args.output, predict_schema(predictor.classes))
        else:
            stream = stack.enter_context(atomic_output(output, "w", keep_partial=True, newline="",
                                                       errors="backslashreplace")) if output else sys.stdout
            writer = RowWriter(stream, fmt, predictor.classes)
        stack.callback(writer.close)
        try:
            with closing(predictor.predict_paths(good, workers=args.workers)) as results:
                for source in progress_bar(sources, quiet=args.quiet or len(sources) < 2, desc="predicting",
                                           unit="img"):
                    result = ImageResult(path=source.path, error=source.error) if source.error else next(results)
                    for row in result.rows():
                        writer.write(row)
                    if args.annotate and result.status != "error":
                        drawn += _draw(result, pictures[result.path])
                    done += 1
        except KeyboardInterrupt:
            where = f"the rows of those were kept in {args.output}" if output else "their rows were written"
            raise _interrupted(f"{done} of {len(sources)} images done; {where}", drawn, args.annotate) from None
    if args.annotate:
        _say(f"{drawn} annotated picture(s) in {args.annotate}, in the folder structure of the inputs",
             quiet=args.quiet)
    return 0


def _interrupted(message: str, drawn: int = 0, annotate: Path | None = None) -> KeyboardInterrupt:
    """The Ctrl-C of a run that kept its finished work: `message` says what was done and where it is."""
    from facerace.errors import Interrupted

    return Interrupted(message + (f"; {drawn} annotated picture(s) in {annotate}" if annotate else ""))


def _draw(result: ImageResult, target: Path) -> int:
    """Save `result`'s picture with its faces drawn at `target`; 1 if saved, 0 if the file became unreadable."""
    from facerace.apps.draw import annotate, save_picture
    from facerace.errors import ImageError
    from facerace.images import load_image

    try:
        rgb = load_image(result.path)
    except ImageError:  # changed or deleted since it was analysed; its row is written
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    save_picture(annotate(rgb, result.faces), target)
    return 1


def _embed(args: argparse.Namespace) -> int:
    from facerace.apps.sources import check_output, expand
    from facerace.errors import Interrupted
    from facerace.predictor import Predictor, embed

    predictor = Predictor(args.model, detector=args.detector, backbone=args.backbone,
                          backbone_weights=args.backbone_weights, min_face=args.min_face, max_faces=args.max_faces)
    predictor.validate()
    if _engine_is_ray(args):
        return _ray(args, predictor)
    sources = expand(args.paths, column=args.column, root=args.root, quiet=args.quiet)
    good = [s.path for s in sources if s.error is None]
    check_output(args.output, [*args.paths, *good])
    if args.format == "parquet":
        return _embed_parquet(args, predictor, sources)
    if Path(args.output).suffix.lower() != ".npz":  # numpy would write OUTPUT.npz, not the file named
        raise InvalidParameterError(f"embed writes a NumPy .npz file: name it *.npz, not {args.output} "
                                    f"(or pass --format parquet for a Parquet folder)")
    listed = [f"{s.path}: {s.error}" for s in sources if s.error]
    try:
        result = embed(good, predictor, progress=not args.quiet)
    except Interrupted as stop:  # the images finished before Ctrl-C are saved
        dataclasses.replace(stop.partial, errors=(*listed, *stop.partial.errors)).save(args.output)
        raise _interrupted(f"{stop}; their {len(stop.partial.paths)} face(s) were kept in {args.output}") from None
    errors = [*listed, *result.errors]
    result = dataclasses.replace(result, errors=tuple(errors))
    result.save(args.output)
    _say(f"{len(result.paths)} face(s) from {len(sources) - len(errors)} image(s) -> {args.output}"
         + (f"; {len(errors)} unreadable: " + "; ".join(errors[:3]) if errors else "")
         + (f"; only the {args.max_faces} largest faces embedded in: " + "; ".join(result.too_many[:3])
            if result.too_many else ""), quiet=args.quiet)
    return 0


def _embed_parquet(args: argparse.Namespace, predictor: Predictor, sources: list) -> int:
    from facerace.apps.tables import ParquetRowWriter, row_schema
    from facerace.results import ImageResult
    from facerace.textout import progress_bar

    writer = ParquetRowWriter(args.output, row_schema("embed", predictor))
    done = 0
    try:
        for source in progress_bar(sources, quiet=args.quiet or len(sources) < 2, desc="embedding", unit="img"):
            for row in (ImageResult(path=source.path, error=source.error).rows() if source.error
                        else predictor.embed_rows(source.path)):
                writer.write(row)
            done += 1
    except KeyboardInterrupt:
        raise _interrupted(f"{done} of {len(sources)} images done; their rows were kept in {args.output}") from None
    finally:
        writer.close()
    _say(f"{writer.count} row(s) from {len(sources)} image(s) -> {args.output}", quiet=args.quiet)
    return 0


def _train(args: argparse.Namespace) -> int:
    from facerace.training.config import TrainConfig
    from facerace.training.modelcard import rate
    from facerace.training.train import resume, train

    if args.resume:
        run = resume(args.resume, cache_dir=args.cache_dir, workers=args.workers, quiet=args.quiet)
    elif not args.data:
        raise InvalidParameterError("train needs --data KIND:PATH (or --resume RUN)")
    else:
        run = train(TrainConfig.from_flat(vars(args)), out=args.out, cache_dir=args.cache_dir, workers=args.workers,
                    quiet=args.quiet)
    from facerace.model import load_config

    metrics = json.loads((run / "metrics.json").read_text())
    v = metrics["validation"]
    settings = json.loads((run / "config.json").read_text())
    _show(f"run folder: {run}\nmodel: {run / 'model'} (use --model {run})\n"
          f"training mix: {load_config(run).mix_summary() or 'not recorded'}; balance: {settings.get('balance')}\n"
          f"held-out validation: accuracy {rate(v['correct'], v['n'], v['accuracy_ci95'])}, "
          f"macro-F1 {v['macro_f1']:.3f}, "
          f"loss {v['loss']:.3f}, ECE {v['ece']:.3f}; best epoch {metrics['best_epoch']}\n"
          "uncertainty thresholds: " + ", ".join(f"{s} {t['threshold']:.3f}" for s, t in metrics["thresholds"].items()))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from facerace.training.evaluate import evaluate

    run, m = evaluate(args.model, args.data, split=args.split, scheme=args.scheme, out=args.out,
                      path_column=args.path_column, label_column=args.label_column,
                      cache_dir=args.cache_dir, workers=args.workers, quiet=args.quiet)
    from facerace.model import gender_words
    from facerace.training.modelcard import f1_text, headline, rate

    _show(f"{m['data']['spec']} ({m['data']['split']}), scheme {m['scheme']}, n={m['n']}")
    _show("\n".join(headline(m)) + f"\nmacro-F1 {m['macro_f1']:.3f}  loss {m['loss']:.3f}  ECE {m['ece']:.3f}")
    print(f"uncertain (confidence < {m['threshold']}): {rate(m['uncertain'], m['n'], m['uncertain_ci95'])}; "
          f"accuracy on the rest {rate(m['correct_when_certain'], m['certain'], m['accuracy_when_certain_ci95'])}")
    print(f"{'class':<18}{'support':>8}  {'recall (95% CI)':<36}{'precision (95% CI)':<36}{'f1':>6}")
    for name, c in m["per_class"].items():
        print(f"{name:<18}{c['support']:>8}  {_short_rate(c['correct'], c['support'], c['recall_ci95']):<36}"
              f"{_short_rate(c['correct'], c['predicted'], c['precision_ci95'], 'prediction'):<36}{f1_text(c):>6}")
    if m["per_race_gender"]:
        print(f"{'class x gender':<32}{'n':>7}  accuracy (95% CI)")
        for name, row in m["per_race_gender"].items():
            for gender, v in row.items():
                _show(f"{name + ' ' + gender_words(gender):<32}{v['n']:>7}  "
                      f"{_short_rate(v['correct'], v['n'], v['accuracy_ci95'])}")
    if m["merged"]:
        print("merged classes: " + "; ".join(f"{k} <- {', '.join(v)}" for k, v in m["merged"].items()))
    print(f"groups of fewer than {m['min_group_faces']} faces: too few to measure; age x gender and the rest: "
          f"report.md")
    _show(f"run folder: {run}")
    return 0


def _short_rate(k: int, n: int, ci: list[float] | None, noun: str = "face") -> str:
    """A rate as `62.3% (60.5-64.0%; 1,788/2,871)`, or "too few to measure (12 faces)" below the group minimum."""
    from facerace.training.metrics import MIN_GROUP_FACES, wilson
    from facerace.training.modelcard import too_few

    if n < MIN_GROUP_FACES:
        return too_few(n, noun)
    low, high = ci or wilson(k, n)
    return f"{k / n:.1%} ({low:.1%}-{high:.1%}; {k:,}/{n:,})"


def _export(args: argparse.Namespace) -> int:
    from facerace.apps.sources import check_output
    from facerace.export import export_onnx
    from facerace.model import load_config, resolve

    config = load_config(args.model)
    check_output(args.output, resolve(args.model).iterdir())
    path = export_onnx(args.model, args.output)
    size = config.chip_size
    _show(f"{path} ({path.stat().st_size / 1e6:.1f} MB): input chips (n, {size}, {size}, 3) uint8 RGB, aligned "
          f"with padding {config.chip_padding} -> probabilities (n, {len(config.classes)}) over "
          f"{', '.join(config.classes)}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from facerace.apps.audit import Engine, audit
    from facerace.training.runs import next_run_dir

    engine = Engine("ray" if _engine_is_ray(args) else "local", args.ray_address, args.workers, args.detector,
                    args.column)
    result = audit(args.paths, out=args.out or next_run_dir("audit"), by=args.by, scheme=args.scheme,
                   model=args.model, method=args.method, predictions=args.predictions, engine=engine,
                   replicates=args.replicates, labels=args.labels, sample=args.sample, quiet=args.quiet)
    everything = result.groups[0]
    folder = printable(result.folder)
    skipped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in everything.skipped.items())
    labelled = f", {everything.labelled} labelled" if result.labels is not None else ""
    _say(f"{everything.faces} faces{labelled} from {result.images} images ({skipped}) in "
         f"{max(1, len(result.groups) - 1)} group(s); method {result.method_used}: {folder}/report.md",
         quiet=args.quiet)
    if result.sampled is not None:
        _say(f"{sum(result.sampled.values())} faces to label in {folder}/sample.csv: label them with `facerace "
             f"label {folder}`, then run this audit again with --labels {folder}/labels.csv")
    return 0


def _models(args: argparse.Namespace) -> int:
    from facerace.model import list_models

    for m in list_models():
        measured = "".join(f"\n    {line}" for line in _measured(m["metrics"]))
        thresholds = ", ".join(f"{s} {t}" for s, t in m["thresholds"].items())
        _show(f"{m['name']}  (version {m['version']}, {m['backbone']} + {m['detector']} detector)\n"
              f"  classes: {', '.join(m['classes'])}\n  trained on: {m['trained_on']}\n"
              f"  training mix: {m['training_mix_summary'] or 'not recorded (model saved before facerace kept it)'}\n"
              + (f"  caveat: {m['caveat']}\n" if m["caveat"] else "") + f"  measured:{measured or ' -'}\n"
              f"  uncertain below confidence: {thresholds}\n  {m['path']}")
    return 0


#: How `facerace models` names the figures a model's config records, by the end of their key.
MEASURES = (("_accuracy", "accuracy"), ("_macro_f1", "macro-F1"), ("_worst_group", "worst race x gender group"),
            ("_gender_gap_points", "gap between genders (points)"))


def _measured(metrics: dict[str, object]) -> list[str]:
    """A model's recorded figures, one line per evaluation ("fairface val fairface7: accuracy 0.672, ...") and
    its speed."""
    lines: dict[str, list[str]] = {}
    for key, value in metrics.items():
        if key in ("faces_per_second", "speed_measured"):
            continue
        name, word = next(((key[: -len(end)], w) for end, w in MEASURES if key.endswith(end)), ("other", key))
        lines.setdefault("held-out training faces" if name == "validation" else name.replace("_", " "),
                         []).append(f"{word} {value}")
    out = [f"{name}: {', '.join(parts)}" for name, parts in lines.items()]
    if "faces_per_second" in metrics:
        out.append(f"speed: {metrics['faces_per_second']} faces/s ({metrics.get('speed_measured', 'machine not recorded')})")
    return out


def _stream(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from facerace.apps.sources import check_output
    from facerace.apps.stream import VIDEO_SUFFIXES, stream
    from facerace.files import atomic_output
    from facerace.predictor import Predictor

    predictor = Predictor(args.model, scheme=args.scheme, detector=args.detector, threshold=args.threshold)
    predictor.validate()
    check_output(args.output, [args.source])
    video = args.output if args.output and args.output.suffix.lower() in VIDEO_SUFFIXES else None
    rows_file = args.output if args.output and not video else None
    if rows_file and rows_file.suffix.lower() not in (".jsonl", ".ndjson"):
        raise InvalidParameterError(f"-o {rows_file}: give a video ({', '.join(VIDEO_SUFFIXES)}) or a JSON-lines "
                                    "file (.jsonl) for the rows")
    rows = bool(args.format or rows_file or not (video or args.display))
    with atomic_output(rows_file, "w", keep_partial=True) if rows_file else nullcontext(sys.stdout) as out:
        for frame in stream(args.source, predictor, output=video, display=args.display,
                            classify_every=args.classify_every, smooth=args.smooth, max_frames=args.max_frames,
                            report_every_s=None if args.quiet else 2.0):
            if rows:
                out.writelines(json_text(row) + "\n" for row in frame.rows())
                out.flush()
    if args.output:
        _say(f"{'annotated video' if video else 'rows'}: {args.output}", quiet=args.quiet)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    import uvicorn

    from facerace.apps.serve.app import load_predictor
    from facerace.apps.serve.server import uvicorn_options

    _check_port(args.host, args.port)  # before "serving on": a port in use is a usage error, not uvicorn's exit 3
    load_predictor(args.model)  # a missing model or damaged weights stop here, before the server starts
    os.environ.update(FACERACE_MODEL=str(args.model), FACERACE_MAX_UPLOAD_BYTES=str(int(args.max_upload_mb * 2**20)),
                      FACERACE_TIMEOUT_S=str(args.timeout), FACERACE_HEADER_TIMEOUT_S=str(args.header_timeout),
                      FACERACE_BODY_TIMEOUT_S=str(args.body_timeout))
    _say(f"facerace serving on http://{args.host}:{args.port}/ (API docs at /docs); Ctrl-C stops", quiet=args.quiet)
    uvicorn.run("facerace.apps.serve.app:app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, **uvicorn_options(args.max_connections, quiet=args.quiet))
    return 0


def _label(args: argparse.Namespace) -> int:
    import uvicorn

    from facerace.apps.label.app import create_app
    from facerace.apps.serve.server import uvicorn_options

    app = create_app(args.folder, args.scheme, hosts=(args.host,))  # a folder without a sample stops here
    _check_port(args.host, args.port)
    store = app.state.store
    _say(f"labelling {store.state()['total']} faces ({store.state()['answered']} done) at "
         f"http://{args.host}:{args.port}/ ; every answer is saved to {args.folder / 'labels.csv'}; Ctrl-C stops",
         quiet=args.quiet)
    uvicorn.run(app, host=args.host, port=args.port, **uvicorn_options(quiet=args.quiet))
    return 0


def _check_port(host: str, port: int) -> None:
    """Refuse (usage error naming it) an address the server could not listen on: a port in use, out of range,
    privileged, or a host that is not this machine's."""
    import socket

    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except (OSError, OverflowError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InvalidParameterError(f"cannot listen on {host}:{port} ({reason}): another program may use port "
                                    f"{port}; choose another --port (or --host)") from None


def _datasets(args: argparse.Namespace) -> int:
    from facerace.training.datasets import check_dataset

    report = check_dataset(args.data, path_column=args.path_column, label_column=args.label_column,
                           progress=not args.quiet)
    for split, r in report["splits"].items():
        _show(f"{args.data} split {split}: {r['images']:,} readable images, scheme {r['scheme']}")
        for key in ("per_class", "per_gender", "per_age"):
            if r[key]:
                _show(f"  {key.removeprefix('per_')}: " + ", ".join(f"{k} {v:,}" for k, v in r[key].items()))
        if r["per_race_gender"]:
            _show("  class x gender:\n" + "\n".join(f"    {c}: " + ", ".join(f"{g} {n:,}" for g, n in row.items())
                                                    for c, row in r["per_race_gender"].items()))
    problems = report["problems"]
    print(f"{len(problems)} problem(s)" + (":" if problems else ""))
    for line in problems:
        _show(f"  {line}")
    return 1 if problems and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
