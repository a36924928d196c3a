"""embeddings -> probabilities: a small softmax classifier trained with Adam, in numpy."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from facerace.errors import InvalidParameterError


@dataclass
class History:
    """Per-epoch train/validation loss and the epoch whose weights were kept."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int = -1


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(probs: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean negative log-likelihood of integer labels `y` under `probs` (weighted by `weights` if given)."""
    return float(-np.average(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)), weights=weights))


def group_weights(groups: Sequence[str] | np.ndarray) -> np.ndarray:
    """One weight per example, inversely proportional to the size of its group, with mean 1: every group
    then weighs as much in the loss as every other."""
    _, inverse, counts = np.unique(np.asarray(groups, dtype=str), return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse]
    return w * len(w) / w.sum()


def _weights(weights: np.ndarray | None, n: int, name: str) -> np.ndarray:
    """`weights` as a float array of length n (ones when None); refuses negative, non-finite or all-zero ones."""
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise InvalidParameterError(f"{name} must be {n} finite, non-negative weights with a positive sum")
    return w


@dataclass(frozen=True)
class HeadParams:
    """The head's hyper-parameters. `max_epochs` and `patience` left None take `resolved`'s defaults,
    which differ when the network's last layers are fine-tuned with the head (each epoch costs more)."""

    hidden: int = 512
    learning_rate: float = 3e-4
    weight_decay: float = 3e-3
    dropout: float = 0.6
    batch_size: int = 128
    max_epochs: int | None = None
    patience: int | None = None

    def resolved(self, fine_tuning: bool = False) -> HeadParams:
        """These settings with `max_epochs` and `patience` filled in: 200 / 15, or 40 / 5 when fine-tuning."""
        epochs, patience = (40, 5) if fine_tuning else (200, 15)
        return replace(self, max_epochs=self.max_epochs or epochs, patience=self.patience or patience)


class RaceHead:
    """Standardise -> [dense + ReLU] -> dense -> softmax / temperature.

    `params.hidden=0` gives multinomial logistic regression. `fit` uses Adam on mini-batches,
    keeps the weights with the lowest validation loss and stops after `patience` epochs
    without improvement; then fits a temperature on the validation set (calibration).
    The layer layout lives here once: `torch_layers`, `to_torch` and `from_torch` give the same
    layers in PyTorch (fine-tuning trains them, export writes them).
    """

    def __init__(self, classes: tuple[str, ...] = (), params: HeadParams | None = None, *,
                 random_state: int = 0) -> None:
        self.classes = tuple(classes)
        self.params = (params or HeadParams()).resolved()
        self.random_state = random_state

    # ---- model ---------------------------------------------------------------
    def _init(self, dim: int, n_classes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        sizes = [dim, self.params.hidden, n_classes] if self.params.hidden else [dim, n_classes]
        params: dict[str, np.ndarray] = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            params[f"w{i}"] = (rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32)
            params[f"b{i}"] = np.zeros(b, np.float32)
        return params

    def _logits(self, x: np.ndarray, params: dict[str, np.ndarray], rng=None):
        acts = [x]
        n_layers = len(params) // 2
        for i in range(n_layers):
            z = acts[-1] @ params[f"w{i}"] + params[f"b{i}"]
            if i < n_layers - 1:
                z = np.maximum(z, 0)
                if rng is not None and self.params.dropout > 0:
                    z = z * (rng.random(z.shape) >= self.params.dropout) / (1 - self.params.dropout)
            acts.append(z)
        return acts

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean_) / self.scale_).astype(np.float32)

    # ---- training ------------------------------------------------------------
    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        x_val: np.ndarray,
        y_val: np.ndarray,
        *,
        sample_weight: np.ndarray | None = None,
        val_weight: np.ndarray | None = None,
        on_epoch: Callable[[int, History], None] | None = None,
    ) -> RaceHead:
        """Train on (x, y) with early stopping on (x_val, y_val); labels are class indices.

        `sample_weight` weighs each training example's loss (e.g. `group_weights`, to balance groups) and
        `val_weight` each validation example's in early stopping; the temperature is fitted unweighted, so
        probabilities stay calibrated on the validation faces as they are.
        """
        if not self.classes:
            raise InvalidParameterError("RaceHead needs classes=(...) before fit")
        w = _weights(sample_weight, len(x), "sample_weight")
        wv = _weights(val_weight, len(x_val), "val_weight")
        rng = np.random.default_rng(self.random_state)
        self.mean_ = x.mean(axis=0).astype(np.float32)
        self.scale_ = (x.std(axis=0) + 1e-6).astype(np.float32)
        xs, xv = self._standardise(x), self._standardise(x_val)
        params = self._init(x.shape[1], len(self.classes), rng)
        m = {k: np.zeros_like(v) for k, v in params.items()}
        v = {k: np.zeros_like(p) for k, p in params.items()}
        step, best, wait = 0, np.inf, 0
        self.history_ = History()
        self.temperature_ = 1.0
        best_params = {k: p.copy() for k, p in params.items()}
        for epoch in range(self.params.max_epochs):
            order = rng.permutation(len(xs))
            total = 0.0
            for start in range(0, len(order), self.params.batch_size):
                idx = order[start : start + self.params.batch_size]
                acts = self._logits(xs[idx], params, rng)
                p = softmax(acts[-1])
                total += cross_entropy(p, y[idx], w[idx]) * w[idx].sum()
                grad = p
                grad[np.arange(len(idx)), y[idx]] -= 1.0
                grad *= (w[idx] / w[idx].sum())[:, None]
                step += 1
                for i in reversed(range(len(params) // 2)):
                    gw = acts[i].T @ grad + self.params.weight_decay * params[f"w{i}"]
                    gb = grad.sum(axis=0)
                    if i > 0:
                        grad = (grad @ params[f"w{i}"].T) * (acts[i] > 0)
                    for key, g in ((f"w{i}", gw), (f"b{i}", gb)):
                        m[key] = 0.9 * m[key] + 0.1 * g
                        v[key] = 0.999 * v[key] + 0.001 * g * g
                        mhat = m[key] / (1 - 0.9**step)
                        vhat = v[key] / (1 - 0.999**step)
                        params[key] -= (self.params.learning_rate * mhat / (np.sqrt(vhat) + 1e-8)).astype(np.float32)
            pv = softmax(self._logits(xv, params)[-1])
            val_loss = cross_entropy(pv, y_val, wv)
            self.history_.train_loss.append(total / w.sum())
            self.history_.val_loss.append(val_loss)
            self.history_.val_accuracy.append(float(np.mean(pv.argmax(1) == y_val)))
            if val_loss < best - 1e-5:
                best, wait, self.history_.best_epoch = val_loss, 0, epoch
                best_params = {k: p.copy() for k, p in params.items()}
            else:
                wait += 1
            if on_epoch:
                on_epoch(epoch, self.history_)
            if wait >= self.params.patience:
                break
        self.weights_ = best_params
        self.temperature_ = fit_temperature(self._logits(xv, self.weights_)[-1], y_val)
        return self

    # ---- inference -----------------------------------------------------------
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities, shape (n, len(classes)), columns in `classes` order."""
        if not hasattr(self, "weights_"):
            raise InvalidParameterError("this RaceHead is not trained; call fit() or RaceHead.load()")
        if len(x) == 0:
            return np.zeros((0, len(self.classes)), np.float64)
        logits = self._logits(self._standardise(x), self.weights_)[-1].astype(np.float64)
        return softmax(logits / self.temperature_)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Index of the most probable class per row."""
        return self.predict_proba(x).argmax(axis=1)

    # ---- persistence (safetensors: no pickle) --------------------------------
    def save(self, path: str | Path) -> None:
        """Write weights, standardisation and temperature to a .safetensors file."""
        from safetensors.numpy import save_file

        tensors = {**self.weights_, "mean": self.mean_, "scale": self.scale_,
                   "temperature": np.array([self.temperature_], np.float32)}
        save_file({k: np.ascontiguousarray(t) for k, t in tensors.items()}, str(path))

    @classmethod
    def load(cls, path: str | Path, classes: tuple[str, ...]) -> RaceHead:
        """Read a head written by `save`; `classes` come from the model's config."""
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        head = cls(tuple(classes))
        head.mean_, head.scale_ = tensors.pop("mean"), tensors.pop("scale")
        head.temperature_ = float(tensors.pop("temperature")[0])
        head.weights_ = tensors
        head.params = replace(head.params, hidden=tensors["w0"].shape[1] if "w1" in tensors else 0)  # the file's layout
        if tensors[f"w{len(tensors) // 2 - 1}"].shape[1] != len(head.classes):
            raise InvalidParameterError(f"{path}: weights have a different number of classes than {classes}")
        return head

    # ---- the same layers in PyTorch --------------------------------------------
    @staticmethod
    def torch_layers(dim: int, n_classes: int, params: HeadParams):
        """Untrained PyTorch layers of this layout (no standardisation, logits out): what fine-tuning trains."""
        from torch import nn

        if not params.hidden:
            return nn.Sequential(nn.Linear(dim, n_classes))
        return nn.Sequential(nn.Linear(dim, params.hidden), nn.ReLU(), nn.Dropout(params.dropout),
                             nn.Linear(params.hidden, n_classes))

    @classmethod
    def from_torch(cls, layers, mean: np.ndarray, scale: np.ndarray, classes: tuple[str, ...],
                   params: HeadParams) -> RaceHead:
        """A numpy head holding the weights of `torch_layers` output and the standardisation (mean, scale)."""
        from torch import nn

        head = cls(classes, params)
        head.mean_, head.scale_ = np.asarray(mean, np.float32), np.asarray(scale, np.float32)
        dense = [m for m in layers if isinstance(m, nn.Linear)]
        head.weights_ = {f"{kind}{i}": (t.detach().numpy().T if kind == "w" else t.detach().numpy()).copy()
                        for i, m in enumerate(dense) for kind, t in (("w", m.weight), ("b", m.bias))}
        return head

    def to_torch(self):
        """This trained head as a PyTorch module: standardise, dense layers with ReLU, softmax(logits / temperature)."""
        import torch
        from torch import nn

        n = len(self.weights_) // 2
        layers = self.torch_layers(self.weights_["w0"].shape[0], len(self.classes), self.params)
        dense = [m for m in layers if isinstance(m, nn.Linear)]
        assert len(dense) == n, "the stored weights do not have this layout"
        with torch.no_grad():
            for i, m in enumerate(dense):
                m.weight.copy_(torch.from_numpy(np.ascontiguousarray(self.weights_[f"w{i}"].T)))
                m.bias.copy_(torch.from_numpy(self.weights_[f"b{i}"]))
        mean, scale, temperature = self.mean_, self.scale_, self.temperature_

        class Head(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.register_buffer("mean", torch.from_numpy(mean))
                self.register_buffer("scale", torch.from_numpy(scale))
                self.layers = layers

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.softmax(self.layers((x - self.mean) / self.scale) / temperature, dim=1)

        return Head().eval()


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (golden-section on log T)."""
    logits = logits.astype(np.float64)

    def nll(log_t: float) -> float:
        return cross_entropy(softmax(logits / np.exp(log_t)), y)

    lo, hi = np.log(0.05), np.log(20.0)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(60):
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    return float(np.exp((lo + hi) / 2))
