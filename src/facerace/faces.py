"""The face pipeline: image -> faces -> chips -> embeddings (detect, keep large faces, align, embed).

One object used by prediction, training, evaluation, fine-tuning views and the stream, so the
minimum face size, the chip geometry and the mirror averaging are decided in one place, and
embedding-cache keys derive from it.

A FUSED pipeline names several networks joined by "+" (`dlib-resnet-v1-onnx+sface`): one
detection per image, then each network cuts its own chips (its own alignment) and embeds them
with its own mirror setting; the embedding is their concatenation, in that order (the head
standardises every feature, so the parts need no scaling). Its chips are a tuple, one array per network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from facerace.align import Aligner, SFaceAligner, create_aligner
from facerace.backbones import FUSE, Backbone, FusedBackbone, InputSpec, chip_spec, create_backbone, split_backbones
from facerace.detect import Detection, Detector, create_detector, known_face_region
from facerace.errors import InvalidParameterError

#: Chips of one or more faces: an array (n, s, s, 3) uint8, or for a fused pipeline a tuple of them, one per network.
Chips = np.ndarray | tuple[np.ndarray, ...]

#: Faces whose box is smaller than this (pixels, shorter side) are reported as too_small.
MIN_FACE = 32
#: At most this many faces of one image (the largest) are analysed; the others are reported as too_many.
MAX_FACES = 256
#: Chips are embedded this many at a time, so memory stays bounded however many faces an image has.
EMBED_BATCH = 32


@dataclass(frozen=True)
class Faces:
    """What the pipeline found in one image: every detection, and for the large ones (at most `max_faces`,
    the largest) their landmarks and chips; `too_many` are the large faces beyond that limit."""

    found: tuple[Detection, ...]
    large: tuple[Detection, ...]
    landmarks: np.ndarray
    chips: Chips
    too_many: tuple[Detection, ...] = ()


@dataclass
class FacePipeline:
    """Picklable settings of image -> faces -> chips -> embeddings; detector, aligner and network load on first use.

    `chips` overrides the backbone's own chip geometry (a model records the one it was trained with);
    `flip_average` embeds each face as the mean of it and its mirror image (a fused pipeline, `backbone`
    "a+b", takes one chip geometry and flip setting per network; a single value applies to all);
    `max_faces` caps the faces analysed per image (the largest are kept).
    """

    detector: str = "yunet"
    backbone: str = "dlib-resnet-v1-onnx"
    backbone_weights: str | None = None
    tuned: str | None = None
    flip_average: bool | tuple[bool, ...] = False
    min_face: int = MIN_FACE
    upsample: int = 1
    chips: InputSpec | tuple[InputSpec, ...] | None = None
    max_faces: int = MAX_FACES

    def __post_init__(self) -> None:
        if not self.fused and isinstance(self.flip_average, tuple):
            if len(self.flip_average) != 1:
                raise InvalidParameterError(f"backbone {self.backbone} is one network: give one flip setting, "
                                            f"not {len(self.flip_average)}")
            self.flip_average = self.flip_average[0]
        self._detector: Detector | None = None
        self._aligner: Aligner | SFaceAligner | None = None
        self._backbone: Backbone | None = None
        self._members: tuple[FacePipeline, ...] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_detector": None, "_aligner": None, "_backbone": None, "_members": None}

    # ---- fused networks ------------------------------------------------------------
    @property
    def fused(self) -> bool:
        """Whether this pipeline concatenates the embeddings of several networks."""
        return FUSE in self.backbone

    @property
    def members(self) -> tuple[FacePipeline, ...]:
        """One single-network pipeline per network of a fused pipeline (sharing its detector); (self,) otherwise."""
        if not self.fused:
            return (self,)
        if self._members is None:
            names = split_backbones(self.backbone)
            if self.backbone_weights or self.tuned:
                raise InvalidParameterError(f"fused backbone {self.backbone} takes no weights file or fine-tuned layers")
            flips, chips = (v if isinstance(v, tuple) else (v,) * len(names) for v in (self.flip_average, self.chips))
            if len(flips) != len(names) or len(chips) != len(names):
                raise InvalidParameterError(f"fused backbone {self.backbone} needs one flip setting and chip geometry "
                                            f"per network ({len(names)}), got {len(flips)} and {len(chips)}")
            self._members = tuple(FacePipeline(self.detector, name, flip_average=flip, min_face=self.min_face,
                                               upsample=self.upsample, chips=spec)
                                  for name, flip, spec in zip(names, flips, chips))
        return self._members

    def subset(self, indices: Sequence[int]) -> FacePipeline:
        """A new pipeline of some of this one's networks (by position), each with its own settings."""
        parts = [self.members[i] for i in indices]
        if len(parts) == 1:
            m = parts[0]
            return FacePipeline(self.detector, m.backbone, m.backbone_weights, m.tuned, m.flip_average, self.min_face,
                                self.upsample, m.chips)
        return FacePipeline(self.detector, FUSE.join(m.backbone for m in parts), flip_average=tuple(m.flip_average for m in parts),
                            min_face=self.min_face, upsample=self.upsample, chips=tuple(m.chips for m in parts))

    @property
    def flips(self) -> tuple[bool, ...]:
        """The mirror-averaging setting of each network."""
        return tuple(bool(m.flip_average) for m in self.members)

    # ---- parts ---------------------------------------------------------------------
    @property
    def chip_spec(self) -> InputSpec:
        """Chip size and padding the aligner cuts."""
        return self.chips or chip_spec(self.backbone)

    def make_detector(self) -> Detector:
        """A new detector of this pipeline's kind (validates the name)."""
        return create_detector(self.detector, upsample=self.upsample) if self.detector == "hog" \
            else create_detector(self.detector)

    def make_backbone(self) -> Backbone:
        """A new backbone of this pipeline's kind (validates name and files; a fused name gives a FusedBackbone)."""
        return create_backbone(self.backbone, self.backbone_weights, self.tuned)

    def get_detector(self) -> Detector:
        """The detector, loaded on first use."""
        if self._detector is None:
            self._detector = self.make_detector()
        return self._detector

    def get_aligner(self) -> Aligner | SFaceAligner:
        """The aligner of a single-network pipeline, loaded on first use."""
        if self._aligner is None:
            spec = self.chip_spec
            self._aligner = create_aligner(spec.alignment, spec.chip_size, spec.padding)
        return self._aligner

    def get_backbone(self) -> Backbone:
        """The face network, loaded on first use (a fused pipeline's: its members' networks together)."""
        if self._backbone is None:
            self._backbone = FusedBackbone(tuple(m.get_backbone() for m in self.members)) if self.fused \
                else self.make_backbone()
        return self._backbone

    def with_parts(self, other: FacePipeline) -> FacePipeline:
        """Reuse `other`'s loaded parts where its settings for them are the same as this one's; return self."""
        if (other.detector, other.upsample) == (self.detector, self.upsample):
            self._detector = other._detector
        if self.fused or other.fused:
            if (other.backbone, other.flip_average, other.chips) == (self.backbone, self.flip_average, self.chips):
                self._members = tuple(m.with_parts(o) for m, o in zip(self.members, other.members))
            return self
        if other.chip_spec == self.chip_spec:
            self._aligner = other._aligner
        if (other.backbone, other.backbone_weights, other.tuned) == (self.backbone, self.backbone_weights, self.tuned):
            self._backbone = other._backbone
        return self

    # ---- stages --------------------------------------------------------------------
    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an RGB image, largest first."""
        return self.get_detector().detect(rgb)

    def large(self, found: Sequence[Detection]) -> list[Detection]:
        """The faces whose box is at least `min_face` pixels on its shorter side, in order."""
        return [d for d in found if min(d.box[2], d.box[3]) >= self.min_face]

    def align(self, rgb: np.ndarray, faces: Sequence[Detection]) -> tuple[np.ndarray, Chips]:
        """(landmarks (n, 5, 2) float32 in image pixels, chips (n, s, s, 3) uint8) of `faces`; a fused
        pipeline gives its first network's landmarks and a tuple of chips, one array per network."""
        if self.fused:
            aligned = [m.align(rgb, faces) for m in self.members]
            return aligned[0][0], tuple(chips for _, chips in aligned)
        return self.get_aligner().align(rgb, faces)

    def embed(self, chips: Chips) -> np.ndarray:
        """Embeddings (n, dim) of chips, `EMBED_BATCH` at a time; with `flip_average`, the mean of each chip's
        and its mirror image's (a fused pipeline: each network's on its own chips, concatenated)."""
        if self.fused:
            if not isinstance(chips, tuple) or len(chips) != len(self.members):
                raise InvalidParameterError(f"fused backbone {self.backbone} embeds a tuple of {len(self.members)} "
                                            "chip arrays, one per network (FacePipeline.align makes them)")
            return np.concatenate([m.embed(c) for m, c in zip(self.members, chips)], axis=1)
        backbone = self.get_backbone()
        if len(chips) <= EMBED_BATCH:
            if not self.flip_average or len(chips) == 0:
                return backbone.embed(chips)
            both = backbone.embed(np.concatenate([chips, chips[:, :, ::-1]]))
            return (both[: len(chips)] + both[len(chips) :]) / 2
        return np.concatenate([self.embed(chips[i : i + EMBED_BATCH]) for i in range(0, len(chips), EMBED_BATCH)])

    def faces(self, rgb: np.ndarray, found: Sequence[Detection] | None = None) -> Faces:
        """Detect (unless `found` is given), keep the large faces (at most `max_faces`) and cut their chips."""
        found = tuple(self.detect(rgb) if found is None else found)
        large = self.large(found)
        keep = {id(d) for d in sorted(large, key=lambda d: -d.box[2] * d.box[3])[: self.max_faces]}
        kept = tuple(d for d in large if id(d) in keep)
        landmarks, chips = self.align(rgb, kept)
        return Faces(found, kept, landmarks, chips, tuple(d for d in large if id(d) not in keep))

    def main_face(self, rgb: np.ndarray, face_padding: float) -> tuple[Chips, bool]:
        """(chips of one face, detected) of a face-crop image: its largest large face, else the crop's known
        face region (`face_padding`, the dataset's margin around the face)."""
        large = self.large(self.detect(rgb))
        face = large[0] if large else known_face_region(rgb.shape, face_padding)
        return self.align(rgb, [face])[1], bool(large)

    def cache_key(self, fallback: float | None = None) -> str:
        """Names everything that changes an embedding: network (and its files), detector, chips, the known
        face region used when no face is found (`fallback`, for face crops), size filter, flip."""
        if self.fused:
            return " + ".join(m.cache_key(fallback) for m in self.members)
        b = self.get_backbone()
        spec = self.chip_spec
        return (f"{b.name}|{b.version}|det={self.detector}|chip={spec.chip_size}/{spec.padding}"
                + (f"/{spec.alignment}" if spec.alignment != "dlib" else "")
                + (f"|fallback={fallback}" if fallback is not None else "")
                + f"|min={self.min_face}" + ("|flip-average" if self.flip_average else "")
                + (f"|space={b.space}" if self.tuned or self.backbone_weights else ""))
