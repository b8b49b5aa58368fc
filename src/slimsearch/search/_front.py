"""``auto``: slimsearch's own sampler, which uses cheap estimates before anything is evaluated."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from optuna.samplers import BaseSampler

from slimsearch.search.samplers import _distributions


class FrontSampler(BaseSampler):
    """``auto``: proposes the candidate predicted to add most to the front, judged cheaply first.

    Why it is ours: every Optuna sampler sees a candidate only after it was evaluated;
    none can use a metric that is known *before* evaluation (latency, energy or size
    predicted from the plan and a device profile). This one does, in three ways:

    * **Cheap before expensive.** Candidates are drawn in bulk (the whole space when it is
      small and categorical, else a random sample, plus every one-choice mutation of the
      current front) and their ``estimate`` is computed; estimated-infeasible ones are
      dropped before anything is trained.
    * **A learned surrogate for the rest.** An objective the estimate covers is predicted
      by a ridge fit of measured on estimated value plus a per-choice correction (it
      learns the device's bias); one it does not cover (accuracy) by an extra-trees
      ensemble over the choices and the estimates, whose spread across trees is the
      uncertainty.
    * **Front-aware choice.** Each candidate's optimistic prediction (mean plus ``kappa``
      spreads) is scored by the hypervolume it would add to the evaluated feasible front
      (trials still running count at their predicted mean, so parallel workers spread
      out), inside a box whose worst corner is the *typical* candidate (the median
      prediction over a random sample of the space): the fast-and-accurate corner users
      care about. A share ``explore`` of proposals is random.

    The first ``n_startup`` trials are spread evenly over the quantiles of the first
    estimated metric (random without an estimate). Deterministic for a seed.
    """

    def __init__(self, *, seed: int = 0, estimate: Optional[Callable[[dict], dict]] = None,
                 constraints: Sequence = (), space: Optional[Mapping[str, Any]] = None, n_startup: int = 10,
                 n_random: int = 200, kappa: float = 0.3, explore: float = 0.1, n_trees: int = 30,
                 enumerate_limit: int = 50_000):
        import optuna

        self._seed = seed
        self._estimate_fn = estimate
        self._constraints = tuple(constraints)
        self._fixed = _distributions(space) if space is not None else None
        self.n_startup, self.n_random, self.kappa, self.explore = n_startup, n_random, kappa, explore
        self.n_trees, self.enumerate_limit = n_trees, enumerate_limit
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self._intersection = optuna.search_space.IntersectionSearchSpace()
        self._rng = None
        self._space_key = None
        self._all_codes = None
        self._estimates: dict[bytes, Any] = {}
        self._estimate_names: Optional[list[str]] = None

    # -- Optuna's sampler interface ------------------------------------------------------

    def reseed_rng(self) -> None:
        self._random.reseed_rng()
        self._rng = None

    def infer_relative_search_space(self, study, trial) -> dict:
        if self._fixed is not None:
            return dict(self._fixed)
        return {n: d for n, d in self._intersection.calculate(study).items() if not d.single()}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def sample_relative(self, study, trial, search_space) -> dict:
        if not search_space:
            return {}
        import numpy as np

        if self._rng is None:
            self._rng = np.random.default_rng(self._seed)
        names = sorted(search_space)
        dists = [search_space[n] for n in names]
        if self._space_key != (names, [repr(d) for d in dists]):
            self._space_key = (names, [repr(d) for d in dists])
            self._all_codes = self._enumerate(dists)
        code = self._choose(study, trial, names, dists)
        return self._decode(code, names, dists)

    # -- candidates as codes: category index, or position in [0, 1] of a numeric range --

    @staticmethod
    def _is_cat(d) -> bool:
        from optuna.distributions import CategoricalDistribution

        return isinstance(d, CategoricalDistribution)

    def _enumerate(self, dists):
        import numpy as np

        if not all(self._is_cat(d) for d in dists):
            return None
        sizes = [len(d.choices) for d in dists]
        if int(np.prod(sizes, dtype=float)) > self.enumerate_limit:
            return None
        grids = np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij")
        return np.stack([g.ravel() for g in grids], axis=1).astype(float)

    def _random_codes(self, dists, n: int):
        import numpy as np

        if self._all_codes is not None:
            return self._all_codes[self._rng.choice(len(self._all_codes), min(n, len(self._all_codes)),
                                                    replace=False)]
        cols = [self._rng.integers(0, len(d.choices), n).astype(float) if self._is_cat(d) else self._rng.random(n)
                for d in dists]
        return np.stack(cols, axis=1)

    def _encode(self, params: Mapping[str, Any], names, dists):
        import math

        out = []
        for n, d in zip(names, dists):
            v = params[n]
            if self._is_cat(d):
                out.append(float(d.choices.index(v)))
            elif d.log:
                out.append((math.log(v) - math.log(d.low)) / max(math.log(d.high) - math.log(d.low), 1e-300))
            else:
                out.append((v - d.low) / (d.high - d.low) if d.high > d.low else 0.0)
        return out

    def _decode(self, code, names, dists) -> dict:
        import math

        from optuna.distributions import IntDistribution

        params = {}
        for c, n, d in zip(code, names, dists):
            if self._is_cat(d):
                params[n] = d.choices[int(c)]
                continue
            u = min(max(float(c), 0.0), 1.0)
            v = math.exp(math.log(d.low) + u * (math.log(d.high) - math.log(d.low))) if d.log else \
                d.low + u * (d.high - d.low)
            if d.step is not None:
                v = d.low + round((v - d.low) / d.step) * d.step
            v = min(max(v, d.low), d.high)
            params[n] = int(round(v)) if isinstance(d, IntDistribution) else float(v)
        return params

    def _mutations(self, front_codes, dists):
        import numpy as np

        out = []
        for code in front_codes:
            for j, d in enumerate(dists):
                if self._is_cat(d):
                    for k in range(len(d.choices)):
                        if k != code[j]:
                            c = code.copy()
                            c[j] = k
                            out.append(c)
                else:
                    for _ in range(3):
                        c = code.copy()
                        c[j] = min(max(c[j] + self._rng.normal(0, 0.1), 0.0), 1.0)
                        out.append(c)
        return np.array(out) if out else np.zeros((0, len(dists)))

    def _features(self, codes, dists):
        import numpy as np

        cols = []
        for j, d in enumerate(dists):
            if self._is_cat(d):
                cols.append(codes[:, [j]] == np.arange(len(d.choices))[None, :])
            else:
                cols.append(codes[:, [j]])
        return np.hstack(cols).astype(float) if cols else np.zeros((len(codes), 0))

    def _estimate(self, codes, names, dists):
        """Estimated metrics of each candidate (rows), NaN where the estimate gave none; memoised."""
        import numpy as np

        from slimsearch.search.driver import _call

        if self._estimate_fn is None:
            return np.zeros((len(codes), 0))
        rows = []
        for code in codes:
            key = code.tobytes()
            if key not in self._estimates:
                values = _call(self._estimate_fn, self._decode(code, names, dists)).get("values") or {}
                if self._estimate_names is None:
                    self._estimate_names = sorted(k for k, v in values.items() if v is not None)
                self._estimates[key] = np.array([np.nan if values.get(k) is None else values[k]
                                                 for k in self._estimate_names], dtype=float)
            rows.append(self._estimates[key])
        return np.array(rows, dtype=float).reshape(len(codes), len(self._estimate_names or []))

    # -- the choice -------------------------------------------------------------------------

    def _choose(self, study, trial, names, dists):
        import numpy as np
        import optuna

        from slimsearch.search.driver import FEASIBLE_ATTR, _key

        TS = optuna.trial.TrialState
        trials = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        taken = {_key({n: t.params[n] for n in names}) for t in trials if all(n in t.params for n in names)}
        done = [t for t in trials if t.state == TS.COMPLETE and all(n in t.params for n in names)]
        running = [t for t in trials if t.state == TS.RUNNING and all(n in t.params for n in names)]

        def free(codes):
            keep = [i for i, c in enumerate(codes) if _key(self._decode(c, names, dists)) not in taken]
            return codes[keep]

        sample = free(self._random_codes(dists, max(self.n_random, 2000 if len(done) < self.n_startup else 0)))
        est_sample = self._estimate(sample, names, dists)
        ok = self._estimated_feasible(est_sample)
        sample, est_sample = sample[ok], est_sample[ok]
        if len(sample) == 0:
            return self._random_codes(dists, 1)[0]
        asked = len([t for t in trials if t.state != TS.FAIL])
        if len(done) < self.n_startup:
            if est_sample.shape[1] == 0:
                return sample[0]
            # spread the first trials over the quantiles of the first estimated metric
            order = np.argsort(est_sample[:, 0], kind="stable")
            k = asked % self.n_startup
            lo, hi = len(order) * k // self.n_startup, max(len(order) * (k + 1) // self.n_startup, 1)
            return sample[order[self._rng.integers(lo, max(hi, lo + 1))]]
        if self._rng.random() < self.explore:
            return sample[self._rng.integers(len(sample))]

        directions = study.directions
        sign = np.array([-1.0 if d == optuna.study.StudyDirection.MAXIMIZE else 1.0 for d in directions])
        metric_names = study.metric_names or [f"objective_{i}" for i in range(len(directions))]
        done_codes = np.array([self._encode(t.params, names, dists) for t in done])
        y = np.array([t.values for t in done], dtype=float) * sign  # minimisation form
        feasible = np.array([t.user_attrs.get(FEASIBLE_ATTR, True) for t in done])
        front = y[feasible]
        front_codes = done_codes[feasible][_nondominated(front)] if len(front) else np.zeros((0, len(dists)))

        candidates = free(np.unique(np.vstack([sample[: self.n_random], self._mutations(front_codes, dists)]),
                                    axis=0))
        est_c = self._estimate(candidates, names, dists)
        ok = self._estimated_feasible(est_c)
        candidates, est_c = candidates[ok], est_c[ok]
        if len(candidates) == 0:
            return sample[self._rng.integers(len(sample))]
        models = self._fit(done_codes, y, dists, metric_names)
        mu_c, sd_c = self._predict(models, candidates, est_c, dists)
        mu_s, _ = self._predict(models, sample[: self.n_random], est_sample[: self.n_random], dists)
        reference = np.median(mu_s, axis=0)
        if len(running):
            run_codes = np.array([self._encode(t.params, names, dists) for t in running])
            mu_r, _ = self._predict(models, run_codes, self._estimate(run_codes, names, dists), dists)
            front = np.vstack([front, mu_r]) if len(front) else mu_r
        optimistic = mu_c - self.kappa * sd_c
        optimistic = self._drop_hopeless(optimistic, sign, metric_names, candidates)
        score = _improvement(optimistic, front, reference)
        if np.nanmax(score) > 0:
            return candidates[int(np.nanargmax(score))]
        # nothing is predicted to add volume: take the one closest to joining the front
        span = np.maximum(np.abs(reference - (front.min(axis=0) if len(front) else reference)), 1e-12)
        gap = np.max((optimistic[:, None, :] - front[None, :, :]) / span, axis=2).min(axis=1) if len(front) else \
            -optimistic.sum(axis=1)
        return candidates[int(np.nanargmin(gap))]

    def _estimated_feasible(self, est):
        import numpy as np

        ok = np.ones(len(est), dtype=bool)
        for c in self._constraints:
            if self._estimate_names and c.metric in self._estimate_names:
                col = est[:, self._estimate_names.index(c.metric)]
                ok &= np.array([c.violation({c.metric: v}) in (0.0, None) for v in col])
        return ok

    def _drop_hopeless(self, optimistic, sign, metric_names, candidates):
        """Candidates whose optimistic prediction still breaks a constraint on an objective score nothing."""
        import numpy as np

        out = optimistic.copy()
        for c in self._constraints:
            if c.metric in metric_names:
                i = metric_names.index(c.metric)
                bad = np.array([bool(c.violation({c.metric: v * sign[i]})) for v in optimistic[:, i]])
                out[bad] = np.nan
        return out

    def _fit(self, codes, y, dists, metric_names):
        import numpy as np
        from sklearn.ensemble import ExtraTreesRegressor

        est = self._estimate(codes, self._space_key[0], dists)
        x = self._features(codes, dists)
        models = []
        for i, name in enumerate(metric_names):
            if self._estimate_names and name in self._estimate_names:
                j = self._estimate_names.index(name)
                models.append(("ridge", j, _ridge(np.hstack([x, est[:, [j]]]), y[:, i])))
            else:
                xe = np.hstack([x, _transform(est)])
                forest = ExtraTreesRegressor(n_estimators=self.n_trees, max_features=0.7, n_jobs=1,
                                             random_state=int(self._rng.integers(2**31 - 1))).fit(xe, y[:, i])
                models.append(("trees", None, forest))
        return models

    def _predict(self, models, codes, est, dists):
        import numpy as np

        x = self._features(codes, dists)
        mus, sds = [], []
        for kind, j, model in models:
            if kind == "ridge":
                w, sigma = model
                mus.append(np.hstack([x, est[:, [j]], np.ones((len(x), 1))]) @ w)
                sds.append(np.full(len(x), sigma))
            else:
                per_tree = np.stack([t.predict(np.hstack([x, _transform(est)])) for t in model.estimators_])
                mus.append(per_tree.mean(axis=0))
                sds.append(per_tree.std(axis=0))
        return np.stack(mus, axis=1), np.stack(sds, axis=1)


def _transform(est):
    """Log of positive estimates (costs span decades); NaN as the column's median."""
    import numpy as np

    out = est.copy()
    for j in range(out.shape[1]):
        col = out[:, j]
        good = ~np.isnan(col)
        if good.any() and (col[good] > 0).all():
            col[good] = np.log(col[good])
        col[~good] = np.median(col[good]) if good.any() else 0.0
    return out


def _ridge(x, y, alpha: float = 1.0):
    """Least squares with a small ridge (intercept unpenalised); returns (weights, residual std)."""
    import numpy as np

    x = np.nan_to_num(x)
    a = np.hstack([x, np.ones((len(x), 1))])
    penalty = alpha * np.eye(a.shape[1])
    penalty[-1, -1] = 0.0
    w = np.linalg.solve(a.T @ a + penalty, a.T @ y)
    resid = y - a @ w
    return w, float(np.sqrt(np.mean(resid**2))) if len(y) else 0.0


def _nondominated(points):
    import numpy as np

    p = np.asarray(points, dtype=float)
    keep = [i for i in range(len(p)) if not np.any(np.all(p <= p[i], axis=1) & np.any(p < p[i], axis=1))]
    return np.array(keep, dtype=int)


def _improvement(candidates, front, reference):
    """Hypervolume each candidate would add (minimisation form); NaN rows score NaN."""
    import numpy as np

    from slimsearch.search.pareto import hypervolume, hypervolume_improvement_2d

    if candidates.shape[1] == 2:
        return np.where(np.isnan(candidates).any(axis=1), np.nan,
                        hypervolume_improvement_2d(np.nan_to_num(candidates, nan=np.inf), front, reference))
    if candidates.shape[1] == 1:
        best = front[:, 0].min() if len(front) else reference[0]
        return np.clip(np.minimum(best, reference[0]) - candidates[:, 0], 0.0, None)
    # three or more objectives: exact improvement for the candidates best on a plain sum
    score = np.full(len(candidates), 0.0)
    order = np.argsort(np.nan_to_num(candidates, nan=np.inf).sum(axis=1))[:64]
    dirs = ["min"] * candidates.shape[1]
    if candidates.shape[1] == 3:
        base = hypervolume(front.tolist(), reference.tolist(), dirs)
        for i in order:
            if not np.isnan(candidates[i]).any():
                score[i] = hypervolume(front.tolist() + [candidates[i].tolist()], reference.tolist(), dirs) - base
    else:
        for i in order:  # more than three: how far it gets below the reference, if no front member dominates it
            c = candidates[i]
            if not np.isnan(c).any() and not np.any(np.all(front <= c, axis=1)):
                score[i] = float(np.prod(np.clip(reference - c, 0.0, None)))
    return score
