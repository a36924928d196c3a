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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from facerace.backbones import create_network
from facerace.errors import CheckpointError, ImageError
from facerace.faces import FacePipeline
from facerace.files import default_cache_dir, notice, sha256_file
from facerace.head import History, RaceHead, fit_temperature, softmax
from facerace.images import load_image
from facerace.parallel import ordered_map, worker_count
from facerace.textout import progress_bar
from facerace.training.augment import view
from facerace.training.config import TrainConfig


@dataclass
class ViewActivations:
    """Picklable: (path, seed, dataset face padding) -> the frozen prefix's activations for every view of the main face.

    The main face is cut by `pipeline` (detector, size filter, the network's chips); its network is never run
    whole: the prefix of PyTorch network `pipeline.backbone` (weights file `pipeline.backbone_weights`) is.
    """

    pipeline: FacePipeline
    unfreeze: int
    views: int

    def __post_init__(self) -> None:
        self._prefix: tuple | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_prefix": None}

    @property
    def cache_key(self) -> str:
        weights = self.pipeline.backbone_weights
        source = weights and sha256_file(Path(weights))[:16]
        return (f"prefix|{self.pipeline.backbone}|{source}|unfreeze={self.unfreeze}|views={self.views}"
                f"|det={self.pipeline.detector}|min={self.pipeline.min_face}|augment-v1")

    def prefix(self) -> tuple[Any, Callable[[Any], Any]]:
        """(frozen prefix of the network, its input normalisation), loaded once per process."""
        if self._prefix is None:
            import torch

            torch.set_num_threads(1)
            net, normalise, _ = create_network(self.pipeline.backbone, self.pipeline.backbone_weights)
            self._prefix = (net.split(self.unfreeze)[0], normalise)
        return self._prefix

    def __call__(self, item: tuple[str, int, float]) -> tuple[np.ndarray | None, bool, str | None]:
        """(activations (views, ...) float16, face detected, error) for one image.

        Without a detected face, the dataset's known face region (`face_padding`) is used."""
        import torch

        path, seed, face_padding = item
        prefix, normalise = self.prefix()
        try:
            rgb = load_image(path)
        except ImageError as exc:
            return None, False, exc.reason
        face, detected = self.pipeline.main_face(rgb, face_padding)
        chips = np.stack([view(face[0], i, seed) for i in range(self.views)])
        with torch.no_grad():
            return prefix(normalise(torch.from_numpy(chips))).numpy().astype(np.float16), detected, None


class FeatureStore:
    """Prefix outputs of a list of images on disk: (n, views, ...) float16 memmap + a done mask.

    Lives in `cache_dir/views/<key>`, keyed by the pipeline and the images' SHA-256s, so
    rerunning the same training resumes where an interrupted one stopped.
    """

    def __init__(self, directory: Path, n: int, shape: tuple[int, ...]) -> None:
        self.directory = directory
        self.computed = 0
        directory.mkdir(parents=True, exist_ok=True)
        features, done = directory / "features.npy", directory / "done.npy"
        if features.is_file() and done.is_file() and self._reopen(n, shape):
            return
        self.features = np.lib.format.open_memmap(features, "w+", np.float16, (n, *shape))
        self.done, self.detected = np.zeros(n, bool), np.zeros(n, bool)

    def _reopen(self, n: int, shape: tuple[int, ...]) -> bool:
        """Open the stored arrays; False (and a notice) if they are damaged or of other shapes."""
        try:
            self.features = np.load(self.directory / "features.npy", mmap_mode="r+")
            self.done = np.load(self.directory / "done.npy")
            self.detected = np.load(self.directory / "detected.npy")
            ok_features = self.features.shape == (n, *shape) and self.features.dtype == np.float16
            ok_masks = self.done.shape == self.detected.shape == (n,) and self.done.dtype == self.detected.dtype == bool
            if ok_features and ok_masks:
                return True
            problem = "arrays of other shapes"
        except (OSError, ValueError, EOFError) as exc:
            problem = str(exc)
        notice(f"the stored views in {self.directory} are damaged ({problem}); computing them again")
        return False

    def commit(self) -> None:
        """Flush features, then the masks that say which rows hold them (so a kill never marks a half-written row)."""
        self.features.flush()
        for name, array in (("detected", self.detected), ("done", self.done)):
            partial = self.directory / f"{name}.tmp.npy"
            np.save(partial, array)
            partial.replace(self.directory / f"{name}.npy")


def compute_views(paths: Sequence[str], digests: Sequence[str], face_paddings: Sequence[float],
                  activations: ViewActivations, *,
                  cache_dir: str | Path | None = None, workers: int | None = None, progress: bool = True,
                  desc: str = "frozen layers") -> FeatureStore:
    """The FeatureStore of `paths`, computing (on all cores) the rows not already on disk."""
    import torch
    key = hashlib.sha256("\n".join([activations.cache_key, *digests, *map(str, face_paddings)]).encode()
                         ).hexdigest()[:20]
    prefix, normalise = activations.prefix()  # with one worker, this computes the views below too
    size = activations.pipeline.chip_spec.chip_size
    with torch.no_grad():
        shape = tuple(prefix(normalise(torch.zeros(1, size, size, 3, dtype=torch.uint8))).shape[1:])
    store = FeatureStore(Path(cache_dir or default_cache_dir()) / "views" / key, len(paths),
                         (activations.views, *shape))
    todo = np.nonzero(~store.done)[0]
    batch = 32 * worker_count(workers, len(todo))
    items = [(str(paths[i]), int(digests[i][:15], 16), face_paddings[i]) for i in todo]
    outputs = ordered_map(activations, items, workers=workers, chunksize=4)
    with progress_bar(total=len(todo), quiet=not progress or not len(todo), desc=desc, unit="img") as bar:
        try:
            for n, (i, (features, detected, error)) in enumerate(zip(todo, outputs), start=1):
                if error is None:  # unreadable images stay not done, and are counted by the caller
                    store.features[i], store.detected[i], store.done[i] = features, detected, True
                if n % batch == 0 or n == len(todo):
                    store.commit()
                    store.computed = n
                    bar.update(n - bar.n)
        finally:
            outputs.close()
    return store


@dataclass
class FineTuned:
    """What fine-tuning produced: a calibrated head (with its `history_`), the tuned layers, validation probabilities."""

    head: RaceHead
    tuned: dict[str, np.ndarray]
    val_probs: np.ndarray


def fit(store: FeatureStore, y: np.ndarray, split: tuple[np.ndarray, np.ndarray], config: TrainConfig,
        classes: tuple[str, ...], checkpoint: Path, *, on_epoch: Callable[[int, History], None] | None = None
        ) -> FineTuned:
    """Train the network's last `unfreeze` units and a head on the stored views; resume from `checkpoint` if present.

    Row `i` of the store has label `y[i]`; rows `split[0]` are trained on (a random view per
    epoch), rows `split[1]` score early stopping (views 0 and 1 averaged after the suffix).
    """
    import torch
    from torch import nn

    train_idx, val_idx = split
    params = config.head_params
    torch.manual_seed(config.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    net, _, _ = create_network(config.backbone, config.backbone_weights)
    _, suffix = net.split(config.unfreeze)
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
    head = RaceHead.torch_layers(dim, len(classes), params)
    # L2 penalty on the head only (as RaceHead); the tuned layers are held near their pretrained values
    # by their small step size and early stopping instead.
    optimizer = torch.optim.Adam([{"params": suffix.parameters(), "lr": config.backbone_learning_rate},
                                  {"params": head.parameters(), "lr": params.learning_rate,
                                   "weight_decay": params.weight_decay}])
    rng = np.random.default_rng(config.seed)
    history, best, wait, start = History(), np.inf, 0, 0
    best_state = None
    if checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        try:
            suffix.load_state_dict(state["suffix"])
            head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            mean, scale, best, wait, best_state = (state[k] for k in ("mean", "scale", "best", "wait", "best_state"))
            history = History(**state["history"])
            rng.bit_generator.state = state["rng"]
            torch.set_rng_state(state["torch_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{checkpoint} does not belong to this run's settings ({exc}); delete it to "
                                  "start the fine-tuning again") from None
        start = len(history.train_loss)
    yt = torch.from_numpy(y)

    def logits(rows_views: list[tuple[np.ndarray, int]]) -> torch.Tensor:
        vecs = sum(embed(rows, v) for rows, v in rows_views) / len(rows_views)
        return head((vecs - mean) / scale)

    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(start, params.max_epochs):
        if wait >= params.patience:
            break
        suffix.train()
        head.train()
        order = rng.permutation(train_idx)
        chosen = rng.integers(0, views, len(order))
        total = 0.0
        for i in range(0, len(order), params.batch_size):
            rows, v = order[i : i + params.batch_size], chosen[i : i + params.batch_size]
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
        # tensors, numbers, strings, lists and dicts only: `load_checkpoint` reads it with weights_only=True
        torch.save({"suffix": suffix.state_dict(), "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                    "mean": mean, "scale": scale, "history": asdict(history), "best": float(best), "wait": wait,
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
    race_head = RaceHead.from_torch(head, mean.numpy(), scale.numpy(), classes, params)
    race_head.temperature_ = fit_temperature(val_logits, y[val_idx])
    race_head.history_ = history
    tuned = {name: p.detach().numpy().copy() for name, p in net.named_parameters()
             if any(p is q for q in suffix.parameters())}
    return FineTuned(race_head, tuned, softmax(val_logits / race_head.temperature_))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A fine-tuning checkpoint, read as tensors and plain values only (never unpickling code)."""
    import pickle

    import torch

    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path} is not a checkpoint this facerace wrote, or is damaged; it was not loaded "
                              f"({reason}). Delete it to start the fine-tuning again") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a facerace checkpoint; delete it to start the fine-tuning again")
    return state


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}
