"""The Ray engine: `predict` and `embed` on a Ray cluster through Ray Data, rows written as a Parquet dataset.

Ray Data streams the image list through a pool of actors (one loaded Predictor each) and
writes their Arrow tables to Parquet with backpressure. Failure handling:

- an image that cannot be read or analysed becomes an "error" row in the actor (never a failed job);
- an actor whose process dies is restarted (at most MAX_RESTARTS times) and its batch retried
  (at most MAX_TASK_RETRIES times; Ray Data's default retries forever, so one poison image would
  never end the job); a batch still failing is dropped, its images are retried one by one, and an
  image that kills its worker every time gets an "error" row from the driver;
- actors reserve ACTOR_CPUS (< 1), leaving room beside one actor per core for Ray Data's own tasks.

The driver writes the rows (`PartWriter`): the actors' Arrow tables stream back to it
(`iter_batches`), and it writes a Parquet file whenever ROWS_PER_FILE rows or FLUSH_SECONDS of
work have gathered, so a crash or Ctrl-C loses at most that much, and Ctrl-C writes what it holds
before it stops. There are no write tasks: Ray keeps at most one idle worker process per CPU, so
next to one actor per core each write task tended to start a new process (Python, Ray, Ray Data:
about 2 s of CPU); one write per 64-image block took half of the CPU of 2 one-core workers
(docs/BENCHMARKS.md, "Scaling out"), one per 10,000 rows still one process per file.

`import ray` happens here only: neither `import facerace` nor the local engine loads Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, Sequence

from facerace.apps.sources import Source, expand
from facerace.apps.tables import (filesystem, new_output_folder, pyarrow, release_output_folder, row_schema,
                                  to_table)
from facerace.errors import Interrupted, InvalidParameterError, MissingDependencyError, check_choice
from facerace.images import IMAGE_SUFFIXES
from facerace.predictor import Predictor
from facerace.results import ImageResult
from facerace.textout import utf8_text

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

KINDS = ("predict", "embed")
#: URI schemes read through pyarrow's file systems (credentials from the usual environment variables / files).
REMOTE = ("s3://", "gs://")
#: CPU reserved per actor: a fraction, so Ray Data's own tasks fit beside one actor per core.
ACTOR_CPUS = 0.75
#: Bounded fault tolerance: restarts per actor, retries per batch on a restarted actor.
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 2
#: Images per Ray block (one actor task) and per call of the actor; rows per Parquet file (at least, but the last).
BLOCK_IMAGES = 64
BATCH_IMAGES = 8
ROWS_PER_FILE = 10_000
#: The driver writes the rows it holds at least this often (seconds), so a crash loses at most this much work.
FLUSH_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a run did: images in, face rows and error rows out, images retried alone after their batch killed its
    worker too often, wall time and the part of it spent starting or joining Ray."""

    images: int
    faces: int
    errors: int
    retried: int
    seconds: float
    startup_seconds: float
    output: str

    def line(self) -> str:
        rate = self.faces / self.seconds if self.seconds > 0 else 0.0
        retried = f", {self.retried} retried alone after a worker died" if self.retried else ""
        return (f"{self.images} images, {self.faces} faces, {self.errors} errors{retried} in {self.seconds:.1f} s "
                f"({rate:.1f} faces/s; Ray start-up {self.startup_seconds:.1f} s) -> {self.output}")


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingDependencyError("--engine ray needs Ray Data: pip install 'facerace[ray]'") from None
    return ray


def list_images(inputs: Sequence[str], *, column: str | None = None, root: str | None = None) -> list[Source]:
    """Images of PATH arguments, in order: what `expand` accepts, plus s3:// and gs:// prefixes (listed recursively)."""
    from pyarrow import fs

    out: list[Source] = []
    for arg in inputs:
        if not arg.startswith(REMOTE):
            out += expand([arg], column=column, root=root)
            continue
        filesys, path = filesystem(arg)
        scheme = arg.split("://", 1)[0]
        try:
            info = filesys.get_file_info(path)
            if info.type == fs.FileType.File:
                out.append(Source(arg))
                continue
            infos = filesys.get_file_info(fs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True))
        except OSError as exc:  # no network, no credentials, no such bucket: pyarrow's message says which
            raise InvalidParameterError(f"{arg}: cannot list this location ({exc})") from None
        found = sorted(f"{scheme}://{i.path}" for i in infos
                       if i.type == fs.FileType.File and os.path.splitext(i.path)[1].lower() in IMAGE_SUFFIXES)
        if not found:
            raise InvalidParameterError(f"{arg}: no image files ({', '.join(IMAGE_SUFFIXES)}) under this prefix")
        out += [Source(p) for p in found]
    return out


class RowsActor:
    """A Ray Data actor: a batch of image paths -> an Arrow table of rows, with one Predictor for its lifetime."""

    def __init__(self, predictor: Predictor, kind: str) -> None:
        import cv2

        cv2.setNumThreads(1)  # one core per actor; the actor pool gives the parallelism
        self.predictor, self.kind = predictor, kind
        self.schema = row_schema(kind, predictor)  # the model loads in the first batch, once per actor
        self._filesystems: dict[str, Any] = {}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows: list[dict[str, Any]] = []
        for path, error in zip(batch["path"], batch["error"]):
            rows += self.rows(str(path), error or None)
        return to_table(rows, self.schema)

    def rows(self, path: str, error: str | None) -> list[dict[str, Any]]:
        """The output rows of one image; any failure becomes its error row."""
        try:
            if error:
                return ImageResult(path=path, error=error).rows()
            image: Any = self._read(path) if path.startswith(REMOTE) else path
            if self.kind == "embed":
                return self.predictor.embed_rows(image, path)
            return dataclasses.replace(self.predictor.predict_image(image), path=path).rows()
        except Exception as exc:  # one image must never fail the job
            return ImageResult(path=path, error=f"{type(exc).__name__}: {exc}").rows()

    def _read(self, uri: str) -> bytes:
        bucket = uri.split("/", 3)[2]
        key = uri.split("://", 1)[0] + "://" + bucket
        if key not in self._filesystems:
            self._filesystems[key] = filesystem(uri)[0]
        with self._filesystems[key].open_input_stream(uri.split("://", 1)[1]) as f:
            return f.read()


def connect(address: str | None, *, quiet: bool = False) -> bool:
    """Join the cluster at `address` (auto, HOST:PORT, ray://...), or start Ray on this machine's cores.

    Without `address`, the environment's RAY_ADDRESS is used as Ray itself does (a cluster this machine was told
    to join), and messages name that variable. Returns whether this call started Ray (then the caller shuts it
    down). A Ray already initialised in this process is used as it is. Ray's usage statistics are off unless the
    environment turns them on (RAY_USAGE_STATS_ENABLED=1): facerace runs offline, and their collector is one
    more process per job. `quiet`: Ray's own messages at start-up are limited to errors.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = _ray()
    setting = f"--ray-address {address}"
    if address is None and os.environ.get("RAY_ADDRESS", "").strip():
        address = os.environ["RAY_ADDRESS"].strip()
        setting = f"RAY_ADDRESS={address} (in the environment; unset it to run Ray on this machine)"
    if address not in (None, "auto"):
        _check_reachable(address, setting)
    if ray.is_initialized():
        return False
    level = "error" if quiet else "warning"
    try:
        if address is None:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level=level)
        else:
            ray.init(address=address, logging_level=level)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InvalidParameterError(
            f"{setting}: cannot join a Ray cluster there ({exc}); start one with `ray start --head`, "
            f"or drop the address to run Ray on this machine") from None
    return True


def _check_reachable(address: str, setting: str) -> None:
    """Refuse at once an address where nothing listens (ray.init would retry it for minutes)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise InvalidParameterError(
            f"{setting}: nothing answers there ({exc}); give the head node's HOST:PORT (the port of "
            f"`ray start --head`, 6379 by default) or ray://HOST:10001, or drop the address to run Ray on this "
            f"machine") from None


class PartWriter:
    """The driver's writer: Arrow tables of rows in, Parquet files `NAME-NNNNN.parquet` in `output` out, one per
    ROWS_PER_FILE rows or FLUSH_SECONDS (whichever comes first) and one for the rest at `flush()`. A local file is
    written under a hidden name and renamed when complete; an object store's appears only when complete."""

    def __init__(self, output: str, name: str) -> None:
        from pyarrow import fs

        self.filesys, self.path = filesystem(output)
        self.local = isinstance(self.filesys, fs.LocalFileSystem)
        self.name, self.files, self.images = name, 0, 0
        self._pending: list[pa.Table] = []
        self._rows, self._since = 0, time.monotonic()

    def add(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._rows += len(table)
        if self._rows >= ROWS_PER_FILE or time.monotonic() - self._since >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the rows held now as one file (nothing if none)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        pa = pyarrow()
        self._since = time.monotonic()
        if not self._rows:
            return
        table = pa.concat_tables(self._pending)
        final = f"{self.path}/{self.name}-{self.files:05d}.parquet"
        target = f"{self.path}/.{self.name}-{self.files:05d}.parquet.partial" if self.local else final
        pq.write_table(table, target, filesystem=self.filesys)
        if self.local:
            self.filesys.move(target, final)
        face = table["face"]  # an image's first row: face 0, or its only row (no face, error)
        self.images += pc.sum(pc.or_kleene(pc.is_null(face), pc.equal(face, 0))).as_py() or 0
        self.files += 1
        self._pending, self._rows = [], 0


def _process(items: list[dict[str, Any]], predictor: Predictor, kind: str, sink: PartWriter, actors: int,
             batch_size: int) -> None:
    """One Ray Data pass over `items` ({"path", "error"} dicts), the rows written by `sink` as they come back."""
    ray = _ray()
    blocks = min(len(items), max(4 * actors, math.ceil(len(items) / BLOCK_IMAGES)))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    with warnings.catch_warnings():  # Ray 2.60 has no named parameter for the restart bounds yet (the pin holds)
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        ds = ds.map_batches(RowsActor, fn_constructor_args=(predictor, kind), batch_size=batch_size,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                            num_cpus=ACTOR_CPUS,
                            max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
    try:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            sink.add(table)
    finally:  # also on Ctrl-C or a failed job: the rows that came back are written
        sink.flush()


def _written(output: str, columns: list[str]) -> pa.Table | None:
    """`columns` of every row written to `output` so far (None while it holds no file)."""
    import pyarrow.dataset as pds
    from pyarrow import fs

    filesys, path = filesystem(output)
    if filesys.get_file_info(path).type != fs.FileType.Directory:
        return None
    dataset = pds.dataset(path, format="parquet", filesystem=filesys)
    return dataset.to_table(columns=columns) if dataset.files else None


def _missing(paths: list[str], output: str) -> set[str]:
    """The paths that have no row in `output` yet."""
    import pyarrow.compute as pc

    pa = pyarrow()
    written = _written(output, ["path"])
    if written is None:
        return set(paths)
    stored = {utf8_text(p): p for p in paths}  # as the rows hold them (a file name's undecodable bytes escaped)
    wanted = pa.array(list(stored), pa.string())
    return {stored[p] for p in wanted.filter(pc.invert(pc.is_in(wanted, value_set=written["path"]))).to_pylist()}


def run(kind: str, inputs: Sequence[str], output: str, predictor: Predictor, *, ray_address: str | None = None,
        workers: int | None = None, column: str | None = None, root: str | None = None,
        quiet: bool = False) -> Summary:
    """Write the `kind` ("predict" or "embed") rows of every input image to the Parquet folder `output`.

    `inputs`: images, folders, globs, CSVs of paths (visible to every node at the same path) or
    s3:// / gs:// prefixes; `output`: a new local folder or object-storage prefix; `ray_address`:
    see `connect`; `workers` (default: the cluster's CPUs) is the size of the actor pool; `quiet`
    turns off Ray Data's progress bars. Every image gets at least one row; rows come in no
    particular order.
    """
    check_choice("kind", kind, KINDS)
    predictor.validate()
    new_output_folder(output)
    try:
        return _run(kind, inputs, output, predictor, ray_address, workers, column, root, quiet)
    except BaseException:  # a job that wrote nothing (no cluster there, Ctrl-C at start-up) leaves no claim
        release_output_folder(output)
        raise


def _run(kind: str, inputs: Sequence[str], output: str, predictor: Predictor, ray_address: str | None,
         workers: int | None, column: str | None, root: str | None, quiet: bool) -> Summary:
    """`run` once its output folder is claimed."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pa = pyarrow()
    sources = list_images(inputs, column=column, root=root)
    if not sources:
        raise InvalidParameterError(f"no images in {', '.join(inputs)}")
    ray = _ray()
    start = time.perf_counter()
    started = connect(ray_address, quiet=quiet)
    startup = time.perf_counter() - start
    context = ray.data.DataContext.get_current()
    log = logging.getLogger("ray.data")  # --quiet: only errors (no progress, plan or "finished" lines)
    saved = context.max_errored_blocks, context.enable_progress_bars, log.level
    context.enable_progress_bars = not quiet
    if quiet:
        log.setLevel(logging.ERROR)
    try:
        actors = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        # a batch that keeps killing its worker is dropped, not fatal: its images are retried alone below
        context.max_errored_blocks = -1
        items = [{"path": s.path, "error": s.error or ""} for s in sources]  # "": Arrow needs one column type
        sinks = [PartWriter(output, "part")]
        try:
            _process(items, predictor, kind, sinks[0], actors, BATCH_IMAGES)
            lost = retried = _missing([s.path for s in sources], output)
            if lost:
                if not quiet:
                    print(f"{len(lost)} image(s) lost with a dead worker; retrying them one by one", file=sys.stderr)
                sinks.append(PartWriter(output, "retried"))
                _process([i for i in items if i["path"] in lost], predictor, kind, sinks[1], min(actors, len(lost)),
                         1)
                lost = _missing(sorted(lost), output)
        except KeyboardInterrupt:
            done = sum(sink.images for sink in sinks)
            raise Interrupted(f"{done} of {len(sources)} images done; their rows were kept in {output} (valid "
                              f"Parquet files)") from None
        if lost:
            reason = f"the worker died on this image {MAX_TASK_RETRIES + 1} times (a crash or out of memory)"
            rows = [r for p in sorted(lost) for r in ImageResult(path=p, error=reason).rows()]
            filesys, path = filesystem(output)
            filesys.create_dir(path, recursive=True)
            pq.write_table(to_table(rows, row_schema(kind, predictor)), f"{path}/lost-images.parquet",
                           filesystem=filesys)
        seconds = time.perf_counter() - start
    finally:
        context.max_errored_blocks, context.enable_progress_bars, level = saved
        log.setLevel(level)
        if started:
            ray.shutdown()
    table = _written(output, ["face", "status"])
    errors = pc.sum(pc.equal(table["status"], pa.scalar("error"))).as_py() or 0
    return Summary(images=len(sources), faces=len(table) - table["face"].null_count, errors=errors,
                   retried=len(retried), seconds=seconds, startup_seconds=startup, output=str(output))
