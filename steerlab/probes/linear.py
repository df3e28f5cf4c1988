"""``LinearProbe``: a logistic-regression probe with the scikit-learn estimator API.

It fits with steerlab's batched Newton solver (:mod:`steerlab.probes.fast`), so it gives the
same solution as ``LogisticRegression(C=C)`` (on standardised features when
``standardize=True``, the default: residual streams have a few huge dimensions), works in
``Pipeline``, ``GridSearchCV`` and ``cross_val_score``, exports its weight vector as a steering
``Direction``, and saves to safetensors. Several classes are fitted one-vs-rest, all in one
batched solve.

Example:
    >>> import numpy as np
    >>> from sklearn.model_selection import cross_val_score
    >>> x = np.random.default_rng(0).normal(size=(100, 6)); y = (x[:, 0] > 0).astype(int)
    >>> bool(cross_val_score(LinearProbe(C=1.0), x, y, cv=5).mean() > 0.85)
    True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from steerlab import _valuefiles, compat
from steerlab._checks import check_finite, layer_index
from steerlab.errors import InvalidValueError, ShapeError, ZeroVectorError
from steerlab.hooks import check_site
from steerlab.probes.fast import fit_standardized
from steerlab.steering.direction import Direction, check_position

if TYPE_CHECKING:
    from steerlab.model import Model

FORMAT = "steerlab.LinearProbe/1"


class LinearProbe(ClassifierMixin, BaseEstimator):
    """L2-regularised logistic regression probe (scikit-learn API, batched Newton fit).

    Args:
        C: inverse regularisation strength, as in scikit-learn.
        standardize: fit on standardised features; ``coef_`` is mapped back to raw coordinates.
        fit_intercept: learn a bias.
        class_weight: ``None``, ``"balanced"`` or a dict ``{class: weight}``.
        max_iter, tol: Newton iterations and stopping tolerance.
    """

    def __init__(self, *, C: float = 1.0, standardize: bool = True, fit_intercept: bool = True, class_weight: str | None = None, max_iter: int = 50, tol: float = 1e-12) -> None:
        self.C = C
        self.standardize = standardize
        self.fit_intercept = fit_intercept
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X, y, sample_weight=None) -> LinearProbe:
        """Fit on features ``X`` ``[n, d]`` and labels ``y`` ``[n]``."""
        X, y = compat.validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        n_classes = len(self.classes_)
        if n_classes < 2:
            raise InvalidValueError(f"LinearProbe needs at least two classes in y, got 1 class: {self.classes_.tolist()}")
        weight = compat.check_sample_weight(sample_weight, X, dtype=np.float64)
        if not weight.any():
            raise InvalidValueError("all sample weights are zero; at least one sample needs a positive weight")
        targets = np.stack([encoded == c for c in range(n_classes)]).astype(np.float64)  # [K, n]
        if n_classes == 2:
            targets = targets[1:]
        if self.class_weight is not None:
            weight = weight * compute_class_weight(self.class_weight, classes=self.classes_, y=y)[encoded]
        x = torch.tensor(X)[None].expand(len(targets), -1, -1)
        info: dict = {}
        w, b = fit_standardized(
            x,
            torch.from_numpy(targets),
            C=self.C,
            sample_weight=torch.from_numpy(weight),
            standardize=self.standardize,
            fit_intercept=self.fit_intercept,
            max_iter=self.max_iter,
            tol=self.tol,
            info=info,
        )
        self.n_iter_ = np.array([info["n_iter"]])
        self.coef_ = w.numpy()
        self.intercept_ = b.numpy()
        return self

    def decision_function(self, X) -> np.ndarray:
        """Logits: ``[n]`` for two classes, ``[n, n_classes]`` otherwise."""
        check_is_fitted(self)
        X = compat.validate_data(self, X, dtype=np.float64, reset=False)
        scores = X @ self.coef_.T + self.intercept_
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``[n, n_classes]`` (one-vs-rest scores normalised for several classes)."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            p = 1.0 / (1.0 + np.exp(-scores))
            return np.stack([1 - p, p], axis=1)
        p = 1.0 / (1.0 + np.exp(-scores))
        return p / p.sum(1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        """Predicted class labels."""
        scores = self.decision_function(X)
        idx = (scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(1)
        return self.classes_[idx]

    def to_direction(
        self, *, layer: int, site: str = "resid_pre", position: str | int = "last", model: str | Model = ""
    ) -> Direction:
        """The unit weight vector (towards the second class) as a one-layer steering Direction.

        An estimator fitted on feature vectors does not know where they came from, so say it: the ``layer``, the
        ``site`` and ``position`` they were collected at, and the ``model`` (a steerlab Model or its name).
        :meth:`Probe.to_direction <steerlab.probes.probe.Probe.to_direction>` takes the same ``layer=`` and reads
        the rest from the probe.

        Example:
            >>> import numpy as np
            >>> x = np.random.default_rng(0).normal(size=(100, 6)); y = (x[:, 0] > 0).astype(int)
            >>> d = LinearProbe().fit(x, y).to_direction(layer=4, position="t_inst")
            >>> d.layers, d.position, bool(d.at(4)[0] > 0.9)
            ((4,), 't_inst', True)
        """
        check_is_fitted(self)
        if self.coef_.shape[0] != 1:
            raise ShapeError(f"to_direction needs a two-class probe; this one has {len(self.classes_)} classes")
        w = torch.from_numpy(self.coef_[0]).float()
        if float(w.norm()) == 0.0:
            raise ZeroVectorError("the probe's weights are zero (it learned nothing), so they give no direction; refit it")
        return Direction(vectors=(w / w.norm())[None], layers=(layer_index(layer),), site=check_site(site),
                         position=check_position(position), method="probe", model=model)  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` file with the weights, classes and parameters (atomically, with a checksum)."""
        check_is_fitted(self)
        meta = {"format": FORMAT, "params": json.dumps(self.get_params()), "classes": json.dumps(self.classes_.tolist())}
        tensors = {"coef": torch.from_numpy(self.coef_), "intercept": torch.from_numpy(self.intercept_)}
        return _valuefiles.write(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> LinearProbe:
        """Read a file written by :meth:`save`; a missing, damaged or foreign file raises ``ValueFileError``."""
        tensors, meta = _valuefiles.read(path, fmt=FORMAT, tensors=["coef", "intercept"], keys=["params", "classes"])
        coef, intercept = tensors["coef"], tensors["intercept"]
        with _valuefiles.parsing(path, "LinearProbe"):
            probe = cls(**json.loads(meta["params"]))
            classes = np.asarray(json.loads(meta["classes"]))
            n_rows = 1 if len(classes) == 2 else len(classes)
            if classes.ndim != 1 or len(classes) < 2 or coef.dim() != 2 or coef.shape[0] != n_rows or intercept.shape != (n_rows,):
                raise ShapeError(
                    f"{len(classes)} classes need coef [{n_rows}, d] and intercept [{n_rows}]; "
                    f"got {tuple(coef.shape)} and {tuple(intercept.shape)}"
                )
            fix = "fit the probe again on finite features"
            check_finite(coef, "the probe's weights (coef_)", fix)
            check_finite(intercept, "the probe's intercept", fix)
        probe.coef_, probe.intercept_ = coef.numpy(), intercept.numpy()
        probe.classes_ = classes
        probe.n_features_in_ = probe.coef_.shape[1]
        return probe
