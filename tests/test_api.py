import inspect
import subprocess
import sys

import facerace
from facerace import predictor
from facerace.apps import cli, ray_engine, sources
from facerace.apps.audit import Engine, audit
from facerace.head import HeadParams
from facerace.training.config import TrainConfig
from facerace.training.evaluate import evaluate
from facerace.training.train import train


def _flags(command: str) -> set[str]:
    sub = next(a for a in cli._parser()._actions if a.dest == "command").choices[command]
    return {a.dest for a in sub._actions if a.dest != "help"}


def _params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def test_cli_flags_are_api_parameters():
    config_fields = set(TrainConfig.__dataclass_fields__) | set(HeadParams.__dataclass_fields__)
    assert _flags("train") <= _params(train) | config_fields | {"resume"}
    assert _flags("evaluate") <= _params(evaluate)
    api = _params(predictor.Predictor) | _params(predictor.Predictor.predict_paths) | _params(sources.expand)
    ray = _params(ray_engine.run)  # --engine ray
    assert _flags("predict") - {"format", "output", "annotate", "paths", "quiet", "engine"} <= api | ray
    engine = {"engine", "ray_address", "workers", "detector", "column"}  # audit(engine=Engine(kind, ...))
    assert _flags("audit") - {"quiet"} - engine <= _params(audit) and engine - {"engine"} <= _params(Engine)
    assert _flags("embed") - {"output", "quiet", "format", "engine"} <= _params(predictor.Predictor) \
        | _params(sources.expand) | {"paths"} | ray


def test_public_names():
    assert set(facerace.__all__) == {"analyze", "audit", "Predictor", "embed", "train", "evaluate", "export_onnx",
                                     "TrainConfig", "HeadParams", "load_image", "FaceResult", "ImageResult",
                                     "list_models", "__version__"}
    assert all(callable(getattr(facerace, name)) for name in facerace.__all__ if name != "__version__")
    assert facerace.list_models()[0]["name"] == "default"


def test_import_has_no_side_effects(tmp_path):
    """import facerace: no heavy imports, no network, no files written."""
    code = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise RuntimeError('network used at import')\n"
        "socket.socket.connect = refuse\n"
        "import facerace\n"
        "heavy = {'cv2', 'dlib', 'matplotlib', 'torch', 'ray', 'pyarrow'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {"HOME": str(tmp_path / "home"), "PATH": ""}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
    assert not any(tmp_path.iterdir())
