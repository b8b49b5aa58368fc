"""How ``auto`` turns estimated metrics into surrogate features: log where positive (costs span decades),
a missing estimate as its column's median; decided once per proposal on the candidates' estimates."""

from __future__ import annotations

__all__ = ["apply_form", "form_of"]


def form_of(est):
    """Per estimate column: (log it?, value for a missing one), decided on the candidates' estimates."""
    import numpy as np

    form = []
    for j in range(est.shape[1]):
        col = est[:, j]
        good = col[~np.isnan(col)]
        log = bool(len(good)) and bool((good > 0).all())
        fill = float(np.median(np.log(good) if log else good)) if len(good) else 0.0
        form.append((log, fill))
    return form


def apply_form(est, form):
    """Log of positive estimates (costs span decades); a missing one as the column's median."""
    import numpy as np

    out = np.array(est, dtype=float, copy=True).reshape(len(est), len(form))
    for j, (log, fill) in enumerate(form):
        col = out[:, j]
        missing = np.isnan(col)
        if log:
            col[~missing] = np.log(np.maximum(col[~missing], 1e-300))
        col[missing] = fill
    return out
