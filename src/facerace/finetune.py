"""Fine-tuning the last layers of a face network from images (`facerace train --unfreeze N`).

images -> aligned chips -> `views` views of each (0: the chip, 1: its mirror image, 2 and up:
random augmentations) -> the frozen prefix of the network, run once per view and stored on
disk (float16, resumable) -> the unfrozen suffix + a head, trained on a random view of every
image each epoch, with early stopping on the validation loss of mirror-averaged views (what
prediction computes) and a checkpoint every epoch.

Running the frozen layers once per view, instead of every epoch, is what makes fine-tuning
fit on a laptop CPU; the augmentation is then drawn from `views` fixed views per image.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .align import Aligner
from .augment import view
from .backbones import DlibResNet, InputSpec, require_torch
from .detect import create_detector
from .embeddings import main_face_chip, parallel_batches
from .errors import ImageError, InvalidParameterError
from .head import History, RaceHead, fit_temperature
from .images import load_image
from .model import sha256_file
from .predictor import MIN_FACE

#: The networks that can be fine-tuned, and the backbone that runs the result at prediction time.
NETWORKS = {"dlib-torch": "dlib-resnet-v1-onnx", "vggface": "vggface"}


def load_network(name: str, weights: str | None = None, tuned: str | Path | None = None
                 ) -> tuple[Any, Callable[[Any], Any], InputSpec]:
    """(PyTorch module in eval mode, its input normalisation of uint8 (n, s, s, 3) chip tensors, input spec)
    of fine-tunable network `name`, with the layers of a fine-tuned file `tuned` swapped in."""
    require_torch(f"the PyTorch {name} network")
    if name == "dlib-torch":
        from safetensors.torch import load_file

        from .dlib_torch import load_dlib_resnet, normalise

        net = load_dlib_resnet()
        if tuned:
            net.load_state_dict(load_file(str(tuned)), strict=False)
        return net, normalise, DlibResNet.input_spec
    if name == "vggface":
        if not weights:
            raise InvalidParameterError("the vggface network needs its weights file: --backbone-weights vgg_face_weights.h5")
        from .vggface import VGGFaceBackbone, load_keras_h5, load_tuned, normalise

        net = load_keras_h5(weights)
        return (load_tuned(net, tuned) if tuned else net).eval(), normalise, VGGFaceBackbone.input_spec
    raise InvalidParameterError(f"no PyTorch network for backbone {name!r}; choose one of {', '.join(NETWORKS)}")


@dataclass
class ViewEmbedder:
    """Picklable: (path, seed, dataset face padding) -> the frozen prefix's outputs for every view of the main face."""

    network: str
    weights: str | None
    unfreeze: int
    views: int
    detector: str

    def __post_init__(self) -> None:
        self._parts: tuple | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_parts": None}

    @property
    def pipeline_id(self) -> str:
        source = self.weights and sha256_file(Path(self.weights))[:16]
        return (f"prefix|{self.network}|{source}|unfreeze={self.unfreeze}|views={self.views}|det={self.detector}"
                f"|min={MIN_FACE}|augment-v1")

    def parts(self) -> tuple:
        """(detector, aligner, frozen prefix, input normalisation), loaded once per process."""
        if self._parts is None:
            import cv2
            import torch

            cv2.setNumThreads(1)
            torch.set_num_threads(1)
            net, normalise, spec = load_network(self.network, self.weights)
            prefix, _ = net.split(self.unfreeze)
            self._parts = (create_detector(self.detector), Aligner(spec.chip_size, spec.padding), prefix, normalise)
        return self._parts

    def __call__(self, item: tuple[str, int, float]) -> tuple[np.ndarray | None, bool, str | None]:
        """(features (views, ...) float16, face detected, error) for one image.

        Without a detected face, the dataset's known face region (`face_padding`) is used."""
        import torch

        path, seed, face_padding = item
        detector, aligner, prefix, normalise = self.parts()
        try:
            rgb = load_image(path)
        except ImageError as exc:
            return None, False, exc.reason
        chip, detected = main_face_chip(rgb, detector, aligner, face_padding)
        chips = np.stack([view(chip, i, seed) for i in range(self.views)])
        with torch.no_grad():
            return prefix(normalise(torch.from_numpy(chips))).numpy().astype(np.float16), detected, None


class FeatureStore:
    """Prefix outputs of a list of images on disk: (n, views, ...) float16 memmap + a done mask.

    Lives in `cache_dir/views/<key>`, keyed by the pipeline and the images' SHA-256s, so
    rerunning the same training resumes where an interrupted one stopped.
    """

    def __init__(self, directory: Path, n: int, shape: tuple[int, ...]) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        features, done = directory / "features.npy", directory / "done.npy"
        if features.is_file() and done.is_file():
            self.features = np.load(features, mmap_mode="r+")
            self.done = np.load(done)
            self.detected = np.load(directory / "detected.npy")
        else:
            self.features = np.lib.format.open_memmap(features, "w+", np.float16, (n, *shape))
            self.done, self.detected = np.zeros(n, bool), np.zeros(n, bool)
        self.computed = 0

    def commit(self) -> None:
        """Flush features, then the masks that say which rows hold them (so a kill never marks a half-written row)."""
        self.features.flush()
        for name, array in (("detected", self.detected), ("done", self.done)):
            partial = self.directory / f"{name}.tmp.npy"
            np.save(partial, array)
            partial.replace(self.directory / f"{name}.npy")


def compute_views(paths: Sequence[str], digests: Sequence[str], face_paddings: Sequence[float],
                  embedder: ViewEmbedder, *,
                  cache_dir: str | Path | None = None, workers: int | None = None, progress: bool = True,
                  desc: str = "frozen layers") -> FeatureStore:
    """The FeatureStore of `paths`, computing (on all cores) the rows not already on disk."""
    import torch
    from tqdm import tqdm

    from .cache import default_cache_dir

    key = hashlib.sha256("\n".join([embedder.pipeline_id, *digests, *map(str, face_paddings)]).encode()
                         ).hexdigest()[:20]
    _, aligner, prefix, normalise = embedder.parts()  # with one worker, these compute the views below too
    with torch.no_grad():
        shape = tuple(prefix(normalise(torch.zeros(1, aligner.size, aligner.size, 3, dtype=torch.uint8))).shape[1:])
    store = FeatureStore(Path(cache_dir or default_cache_dir()) / "views" / key, len(paths), (embedder.views, *shape))
    todo = np.nonzero(~store.done)[0]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    items = [(str(paths[i]), int(digests[i][:15], 16), face_paddings[i]) for i in todo]
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress or not len(todo)) as bar:
        for positions, outs in parallel_batches(embedder, items, workers=workers, batch=32 * workers):
            for i, (features, detected, error) in zip(todo[positions.start : positions.stop], outs):
                if error is None:  # unreadable images stay not done, and are counted by the caller
                    store.features[i], store.detected[i], store.done[i] = features, detected, True
            store.commit()
            store.computed += len(positions)
            bar.update(len(positions))
    return store


@dataclass
class FineTuned:
    """What fine-tuning produced: a calibrated head (with its `history_`), the tuned layers, validation probabilities."""

    head: RaceHead
    tuned: dict[str, np.ndarray]
    val_probs: np.ndarray


def fit(store: FeatureStore, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, *, network: str,
        weights: str | None, unfreeze: int, classes: tuple[str, ...], hidden: int, learning_rate: float,
        backbone_learning_rate: float, weight_decay: float, dropout: float, batch_size: int, patience: int,
        max_epochs: int, seed: int, checkpoint: Path, on_epoch: Callable[[int, History], None] | None = None
        ) -> FineTuned:
    """Train the network's last `unfreeze` units and a head on the stored views; resume from `checkpoint` if present.

    Row `i` of the store has label `y[i]`; rows `train_idx` are trained on (a random view per
    epoch), rows `val_idx` score early stopping (views 0 and 1 averaged after the suffix).
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    net, _, _ = load_network(network, weights)
    _, suffix = net.split(unfreeze)
    views = store.features.shape[1]

    def batch(rows: np.ndarray, view_index: np.ndarray | int) -> torch.Tensor:
        order = np.argsort(rows)  # memmap reads in file order
        x = np.empty((len(rows), *store.features.shape[2:]), np.float32)
        x[order] = store.features[rows[order], np.asarray(view_index)[order] if np.ndim(view_index) else view_index]
        return torch.from_numpy(x)

    def embed(rows: np.ndarray, view_index: np.ndarray | int) -> torch.Tensor:
        return torch.cat([suffix(batch(rows[i : i + 256], view_index if np.ndim(view_index) == 0
                                       else view_index[i : i + 256])) for i in range(0, len(rows), 256)])

    with torch.no_grad():
        sample = embed(np.sort(train_idx[:2000]), 0)
    mean, scale = sample.mean(0), sample.std(0) + 1e-6
    dim = sample.shape[1]
    head = (nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, len(classes)))
            if hidden else nn.Sequential(nn.Linear(dim, len(classes))))
    # L2 penalty on the head only (as RaceHead); the tuned layers are held near their pretrained values
    # by their small step size and early stopping instead.
    optimizer = torch.optim.Adam([{"params": suffix.parameters(), "lr": backbone_learning_rate},
                                  {"params": head.parameters(), "lr": learning_rate, "weight_decay": weight_decay}])
    rng = np.random.default_rng(seed)
    history, best, wait, start = History(), np.inf, 0, 0
    best_state = None
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        suffix.load_state_dict(state["suffix"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        mean, scale, history, best, wait, best_state = (state[k] for k in ("mean", "scale", "history", "best",
                                                                            "wait", "best_state"))
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start = len(history.train_loss)
    yt = torch.from_numpy(y)

    def logits(rows_views: list[tuple[np.ndarray, int]]) -> torch.Tensor:
        vecs = sum(embed(rows, v) for rows, v in rows_views) / len(rows_views)
        return head((vecs - mean) / scale)

    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(start, max_epochs):
        if wait >= patience:
            break
        suffix.train()
        head.train()
        order = rng.permutation(train_idx)
        chosen = rng.integers(0, views, len(order))
        total = 0.0
        for i in range(0, len(order), batch_size):
            rows, v = order[i : i + batch_size], chosen[i : i + batch_size]
            out = head((suffix(batch(rows, v)) - mean) / scale)
            loss = loss_fn(out, yt[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        suffix.eval()
        head.eval()
        with torch.no_grad():
            val_logits = logits([(val_idx, 0), (val_idx, min(1, views - 1))])
            val_loss = float(loss_fn(val_logits, yt[val_idx]))
        history.train_loss.append(total / len(order))
        history.val_loss.append(val_loss)
        history.val_accuracy.append(float((val_logits.argmax(1) == yt[val_idx]).float().mean()))
        if val_loss < best - 1e-5:
            best, wait, history.best_epoch = val_loss, 0, epoch
            best_state = {"suffix": _copy(suffix.state_dict()), "head": _copy(head.state_dict())}
        else:
            wait += 1
        partial = checkpoint.with_suffix(".tmp")
        torch.save({"suffix": suffix.state_dict(), "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                    "mean": mean, "scale": scale, "history": history, "best": best, "wait": wait,
                    "best_state": best_state, "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state()}, partial)
        partial.replace(checkpoint)
        if on_epoch:
            on_epoch(epoch, history)
    suffix.load_state_dict(best_state["suffix"])
    head.load_state_dict(best_state["head"])
    suffix.eval()
    head.eval()
    with torch.no_grad():
        val_logits = logits([(val_idx, 0), (val_idx, min(1, views - 1))]).double().numpy()
    race_head = _to_race_head(head, mean, scale, classes, hidden, dropout)
    race_head.temperature_ = fit_temperature(val_logits, y[val_idx])
    race_head.history_ = history
    tuned = {name: p.detach().numpy().copy() for name, p in net.named_parameters()
             if any(p is q for q in suffix.parameters())}
    from .head import softmax

    return FineTuned(race_head, tuned, softmax(val_logits / race_head.temperature_))


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def _to_race_head(head: Any, mean: Any, scale: Any, classes: tuple[str, ...], hidden: int, dropout: float) -> RaceHead:
    """The torch head as a numpy RaceHead (same layers), so prediction needs no PyTorch."""
    from torch import nn

    race_head = RaceHead(classes, hidden=hidden, dropout=dropout)
    race_head.mean_, race_head.scale_ = mean.numpy(), scale.numpy()
    dense = [m for m in head if isinstance(m, nn.Linear)]
    race_head.params_ = {f"{kind}{i}": t.detach().numpy().T.copy() if kind == "w" else t.detach().numpy().copy()
                         for i, m in enumerate(dense) for kind, t in (("w", m.weight), ("b", m.bias))}
    return race_head
