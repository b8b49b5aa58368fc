"""``auto``: slimsearch's own sampler, which uses cheap estimates before anything is evaluated."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from optuna.samplers import BaseSampler

from slimsearch.search.pareto import hypervolume_improvement, nondominated
from slimsearch.search.samplers._estimates import apply_form, form_of
from slimsearch.search._teller import distributions


class FrontSampler(BaseSampler):
    """``auto``: proposes the candidate predicted to add most to the front's accurate-and-cheap corner.

    Why it is ours: every Optuna sampler sees a candidate only after it was evaluated;
    none can use what is known *before* evaluation (latency, energy or size predicted from
    the plan and a device profile, the model's MACs or layer counts). This one does:

    * **Cheap before expensive.** Candidates are estimated before they are scored;
      estimated-infeasible ones and ones already asked are never proposed. They are
      ``n_random`` random points of the space (all of it during the startup, when it is
      categorical and at most ``enumerate_limit`` points) plus the neighbours of the
      evaluated front: every candidate within ``n_near`` changed choices of a member when
      the space is enumerable, every one-choice change otherwise. The neighbours are
      where good candidates cluster (the small changes of a good architecture or plan);
      the random points keep the search global and are the sample the corner is set on.
      A slow ``estimate`` (over 5 ms a call) is called at most ``estimate_seconds`` worth
      of times per proposal (and at least 16), so a proposal stays cheap; the front's
      neighbours (shuffled) and the random points then take turns, so both are estimated.
    * **Startup spread over the estimate.** The first ``n_startup`` trials are drawn one
      from each of ``n_startup`` equal strata of an estimated objective (random without an
      estimate): a sample of the space that covers its whole cost range.
    * **A surrogate for every objective.** A random forest per objective over the choices
      (one-hot; positions for numeric ones; per-choice counts across dimensions that share
      their choices, e.g. how many layers take each bit-width) and every estimated value;
      the spread over its trees is the uncertainty. Targets with positive values spanning
      a decade are fitted on a log scale, and on an objective the estimate does not cover
      the worst quarter of measured values is clipped to its 75th percentile: the surrogate
      has to rank candidates near the front, not the diverged ones (10% accuracy) far from it.
    * **The estimate as the trend.** On an objective the estimate covers (latency predicted
      from the device profile), the forest fits only what a straight line through (estimate,
      measured) pairs leaves over. A forest on a few dozen trials splits on many features and
      blurs the estimate it was given: on NAS-Bench-201 x Raspberry Pi 4 it put a whole group
      of cells measured at 20-22 ms at 26-27 ms, outside the corner, so they were never asked.
    * **Front-aware choice.** Each candidate's optimistic prediction (mean improved by
      ``k`` tree spreads, ``k`` drawn per proposal uniformly from the ``kappa`` range, so
      bold and cautious proposals alternate instead of one fixed trade-off stalling the run
      in the first good region it found) is scored by the hypervolume it would add to the evaluated
      feasible front (running trials count at their predicted mean, so parallel workers
      spread out) inside the *corner box*: better than ``estimated_share`` of the space on
      what the estimate covers (the median of the predicted value over the candidates),
      and better than ``measured_share`` of the startup sample on what only evaluation
      shows. This is the fast-and-accurate corner users care about (the box the project's
      NAS-Bench-201 benchmark scores). When no candidate is predicted to add volume there,
      the box widens to the worst values measured, so the rest of the front is filled in.
    * **No cost level written off unseen.** The corner's candidates are cut into ``n_strata``
      equal strata of their estimated cost (the first objective the estimate covers). While a
      stratum holding candidates predicted to add to the corner has had fewer than
      ``stratum_min`` trials asked, the proposal is the best of those candidates in the least
      asked such stratum. Accuracy varies widely between cells of one estimated cost (on
      NAS-Bench-201 x Raspberry Pi 4, from 80% to 93% at one predicted latency), so a few bad
      startup draws made the surrogate write off a whole level, and the run spent its budget
      on one cost band (often a plateau at the corner's edge), leaving the front's other steps empty.

    With ``calibration`` (:class:`~slimsearch.search.OnlineCalibration`) a constraint on an
    estimated metric is judged on the corrected estimate. Everything else uses the raw one:
    the trend above already calibrates it against the measured values at each proposal, and a
    factor on top changes only floating-point rounding (which, with NAS-Bench-201's near-tied
    estimates, sent runs down other paths).

    Deterministic for a seed: each proposal is seeded by the seed and the trial number.
    Per proposal: a line and two forest fits on the evaluated trials and a prediction per candidate.
    """

    def __init__(self, *, seed: int = 0, estimate: Optional[Callable[[dict], dict]] = None,
                 constraints: Sequence = (), space: Optional[Mapping[str, Any]] = None, n_startup: int = 20,
                 n_trees: int = 60, kappa: tuple[float, float] = (0.5, 2.0), measured_share: float = 0.75, estimated_share: float = 0.5,
                 n_random: int = 1000, n_near: int = 2, enumerate_limit: int = 20_000,
                 estimate_seconds: float = 1.0, n_strata: int = 5, stratum_min: int = 5, calibration=None):
        import optuna

        self._seed = seed
        self._estimate_fn = estimate
        self._calibration = calibration
        self._constraints = tuple(constraints)
        self._fixed = distributions(space) if space is not None else None
        self.n_startup, self.n_trees = n_startup, n_trees
        self.kappa = (float(kappa), float(kappa)) if isinstance(kappa, (int, float)) else tuple(map(float, kappa))
        self.measured_share, self.estimated_share = measured_share, estimated_share
        self.n_random, self.n_near, self.enumerate_limit = n_random, n_near, enumerate_limit
        self.estimate_seconds = estimate_seconds
        self.n_strata, self.stratum_min = n_strata, stratum_min
        self._estimate_calls, self._estimate_time = 0, 0.0
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self._intersection = optuna.search_space.IntersectionSearchSpace()
        self._space_key = None
        self._all_codes = None
        self._estimates: dict[bytes, Any] = {}
        self._estimate_names: Optional[list[str]] = None

    # -- Optuna's sampler interface ------------------------------------------------------

    def reseed_rng(self) -> None:
        """Fresh randomness from the OS (Optuna calls this for each thread of ``optimize(n_jobs=...)``).
        Proposals draw from (seed, trial number), so the seed is drawn anew too, not only the
        random sampler's: otherwise threads would keep proposing alike."""
        import secrets

        self._seed = secrets.randbits(63)
        self._random.reseed_rng()

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

        rng = np.random.default_rng([self._seed, trial.number])
        names = sorted(search_space)
        dists = [search_space[n] for n in names]
        if self._space_key != (names, [repr(d) for d in dists]):
            self._space_key = (names, [repr(d) for d in dists])
            self._all_codes = self._enumerate(dists)
        code = self._choose(study, trial, names, dists, rng)
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

    def _random_codes(self, dists, n: int, rng):
        import numpy as np

        cols = [rng.integers(0, len(d.choices), n).astype(float) if self._is_cat(d) else rng.random(n)
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

    def _mutations(self, front_codes, dists, rng):
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
                        c[j] = min(max(c[j] + rng.normal(0, 0.1), 0.0), 1.0)
                        out.append(c)
        return np.array(out) if out else np.zeros((0, len(dists)))

    def _features(self, codes, dists, est, est_form):
        """One row per candidate: one-hot choices (positions for numeric dimensions), counts of
        each choice over dimensions sharing a choice list, and the transformed estimates."""
        import numpy as np

        cols, groups = [], {}
        for j, d in enumerate(dists):
            if self._is_cat(d):
                cols.append(codes[:, [j]] == np.arange(len(d.choices))[None, :])
                groups.setdefault(repr(d.choices), []).append(j)
            else:
                cols.append(codes[:, [j]])
        for members in groups.values():
            if len(members) > 1:
                size = len(dists[members[0]].choices)
                cols.append((codes[:, members][:, :, None] == np.arange(size)[None, None, :]).sum(axis=1))
        cols.append(apply_form(est, est_form))
        return np.hstack(cols).astype(np.float32)

    def _estimate(self, codes, names, dists, limit: bool = False):
        """Estimated metrics of each candidate (rows), NaN where the estimate gave none; memoised.

        With ``limit``, candidates left unestimated because the estimate is slow (see the
        class docstring) are dropped: returns ``(rows, kept)``.
        """
        import time

        import numpy as np

        from slimsearch.search._teller import call_evaluate as _call

        if self._estimate_fn is None:
            out = np.zeros((len(codes), 0))
            return (out, np.ones(len(codes), dtype=bool)) if limit else out
        rows, kept, new_calls = [], np.ones(len(codes), dtype=bool), 0
        for i, code in enumerate(codes):
            key = code.tobytes()
            if key not in self._estimates:
                if limit and self._slow() and new_calls >= max(16, self.estimate_seconds * self._estimate_calls
                                                               / self._estimate_time):
                    kept[i] = False
                    continue
                started = time.perf_counter()
                values = _call(self._estimate_fn, self._decode(code, names, dists)).get("values") or {}
                self._estimate_time += time.perf_counter() - started
                self._estimate_calls += 1
                new_calls += 1
                if self._estimate_names is None:
                    self._estimate_names = sorted(k for k, v in values.items() if v is not None)
                self._estimates[key] = np.array([np.nan if values.get(k) is None else values[k]
                                                 for k in self._estimate_names], dtype=float)
            rows.append(self._estimates[key])
        out = np.array(rows, dtype=float).reshape(len(rows), len(self._estimate_names or []))
        return (out, kept) if limit else out

    def _slow(self) -> bool:
        """Whether the estimate is slow (over 5 ms a call, after 16), so a proposal makes only a few."""
        return self._estimate_calls >= 16 and self._estimate_time / self._estimate_calls > 0.005

    # -- the choice -------------------------------------------------------------------------

    def _choose(self, study, trial, names, dists, rng):
        import numpy as np
        import optuna

        from slimsearch.search._teller import _key
        from slimsearch.search._types import FEASIBLE_ATTR

        TS = optuna.trial.TrialState
        trials = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number
                  and all(n in t.params for n in names)]
        done = [t for t in trials if t.state == TS.COMPLETE]
        running = [t for t in trials if t.state == TS.RUNNING]
        directions = study.directions
        sign = np.array([-1.0 if d == optuna.study.StudyDirection.MAXIMIZE else 1.0 for d in directions])
        metric_names = study.metric_names or [f"objective_{i}" for i in range(len(directions))]
        done_codes = np.array([self._encode(t.params, names, dists) for t in done]).reshape(len(done), len(dists))
        y = np.array([t.values for t in done], dtype=float).reshape(len(done), len(directions)) * sign
        feasible = np.array([t.user_attrs.get(FEASIBLE_ATTR, True) for t in done], dtype=bool)
        front_codes = done_codes[feasible][nondominated(y[feasible])] if feasible.any() else done_codes[:0]

        # the candidates: a random sample of the space and the front's neighbours; none asked
        # before, none estimated infeasible
        startup = len(done) < self.n_startup
        if self._all_codes is not None:
            radix = np.cumprod([1] + [len(d.choices) for d in dists[:0:-1]])[::-1].astype(float)
            taken = np.array([self._encode(t.params, names, dists) for t in trials]).reshape(-1, len(dists)) @ radix
            free = self._all_codes[~np.isin(self._all_codes @ radix, taken)]
            sample = free[rng.permutation(len(free))[: None if startup else self.n_random]]
            near = free[_within(free, front_codes, self.n_near)]
        else:
            taken = {_key(t.params) for t in trials}
            sample = self._random_codes(dists, self.n_random, rng)
            near = self._mutations(front_codes, dists, rng)
            sample, near = ([c for c in codes if _key(self._decode(c, names, dists)) not in taken]
                            for codes in (sample, near))
            sample, near = (np.array(c).reshape(len(c), len(dists)) for c in (sample, near))
        turns = (np.argsort(np.r_[np.arange(len(sample)) * 2 + 1, rng.permutation(len(near)) * 2], kind="stable")
                 if self._slow() else slice(None))  # the first few estimated: neighbours and random points alike
        pool, in_sample = np.vstack([sample, near])[turns], (np.arange(len(sample) + len(near)) < len(sample))[turns]
        first_rows = np.sort(np.unique(pool, axis=0, return_index=True)[1]) if len(pool) else np.zeros(0, int)
        pool, in_sample = pool[first_rows], in_sample[first_rows]
        est, kept = self._estimate(pool, names, dists, limit=True)
        pool, in_sample = pool[kept], in_sample[kept]
        ok = self._estimated_feasible(est)
        pool, est, in_sample = pool[ok], est[ok], in_sample[ok]
        if len(pool) == 0:  # the space is used up: anything (the driver screens a repeat)
            return self._random_codes(dists, 1, rng)[0]
        if not in_sample.any():
            in_sample[:] = True
        estimated = [bool(self._estimate_names) and m in self._estimate_names for m in metric_names]

        if startup:
            asked = sum(1 for t in trials if t.state in (TS.COMPLETE, TS.RUNNING))
            pick = np.flatnonzero(in_sample)
            return pool[pick[self._startup_index(est[pick], estimated, metric_names, asked, rng)]]

        # surrogates, fitted on the transformed (log where it spans decades) and clipped targets
        est_done = self._estimate(done_codes, names, dists)
        est_form = form_of(est)
        x_pool = self._features(pool, dists, est, est_form)
        x_done = self._features(done_codes, dists, est_done, est_form)
        logs = [bool(np.all(y[:, i] > 0) and y[:, i].max() >= 10 * y[:, i].min()) for i in range(y.shape[1])]
        yt = np.column_stack([np.log(y[:, i]) if logs[i] else y[:, i] for i in range(y.shape[1])])
        run_codes = np.array([self._encode(t.params, names, dists) for t in running]).reshape(len(running), len(dists))
        est_run = self._estimate(run_codes, names, dists)
        x_run = self._features(run_codes, dists, est_run, est_form)
        trend_done, trend_new = self._trend(est_done, np.vstack([est, est_run]), est_form, yt, estimated, metric_names)
        mu, sd = self._fit_predict(x_done, yt - trend_done, np.vstack([x_pool, x_run]), rng,
                                   clip=[not e for e in estimated])
        mu = mu + trend_new
        mu, sd, mu_run = mu[: len(pool)], sd[: len(pool)], mu[len(pool):]

        # the corner box: median prediction where estimated, the startup sample's quartile elsewhere
        first = yt[np.argsort([t.number for t in done], kind="stable")[: self.n_startup]]
        reference = np.array([np.quantile(mu[in_sample, i], self.estimated_share) if estimated[i]
                              else np.quantile(first[:, i], 1.0 - self.measured_share)
                              for i in range(yt.shape[1])])
        front = np.vstack([yt[feasible], mu_run])
        # how optimistic is drawn per proposal (randomised UCB): one fixed weight lets a run stall
        # where its first good region was; varying it mixes bold and cautious proposals
        optimistic = mu - rng.uniform(*self.kappa) * sd
        hopeless = self._hopeless(np.column_stack([np.exp(optimistic[:, i]) if logs[i] else optimistic[:, i]
                                                   for i in range(len(logs))]) * sign, metric_names)
        optimistic[hopeless] = np.inf
        score = hypervolume_improvement(optimistic, front, reference)
        # no cost level of the corner is written off on the surrogate's word alone
        short = self._short_stratum(est, est_done, est_run, estimated, metric_names, mu, reference, in_sample,
                                    score > 0, rng)
        if short is not None:
            score = np.where(short, score, 0.0)
        if not np.nanmax(score) > 0:  # nothing adds to the corner: fill in the rest of the front
            wide = np.maximum(np.vstack([yt, mu]).max(axis=0), reference)
            wide = wide + 0.1 * np.maximum(wide - np.vstack([yt, mu]).min(axis=0), 1e-12)
            score = hypervolume_improvement(optimistic, front, wide)
        if not np.nanmax(score) > 0:
            return pool[int(rng.integers(len(pool)))]
        return pool[int(np.nanargmax(score))]

    def _trend(self, est_done, est_new, est_form, yt, estimated, metric_names):
        """Per objective the estimate covers, a straight-line fit of the (transformed) measured
        values on the (transformed) estimate, at the evaluated trials and at the new rows; zero
        elsewhere. The forests fit what is left over."""
        import numpy as np

        trend_done, trend_new = np.zeros_like(yt), np.zeros((len(est_new), yt.shape[1]))
        if len(yt) < 3:
            return trend_done, trend_new
        e_done, e_new = apply_form(est_done, est_form), apply_form(est_new, est_form)
        for i in range(yt.shape[1]):
            if estimated[i]:
                col = self._estimate_names.index(metric_names[i])
                if np.ptp(e_done[:, col]) > 0:
                    slope, intercept = np.polyfit(e_done[:, col], yt[:, i], 1)
                    trend_done[:, i] = intercept + slope * e_done[:, col]
                    trend_new[:, i] = intercept + slope * e_new[:, col]
        return trend_done, trend_new

    def _short_stratum(self, est, est_done, est_run, estimated, metric_names, mu, reference, in_sample, adds, rng):
        """The candidates predicted to add to the corner in its least-evaluated stratum of estimated
        cost, when that stratum has fewer than ``stratum_min`` trials asked; else None."""
        import numpy as np

        if not self.n_strata or not self.stratum_min or not any(estimated):
            return None
        i = estimated.index(True)
        column = self._estimate_names.index(metric_names[i])
        cost = est[:, column]
        corner = np.isfinite(cost) & (mu[:, i] <= reference[i])
        if (corner & in_sample).sum() < self.n_strata:
            return None
        edges = np.quantile(cost[corner & in_sample], np.linspace(0, 1, self.n_strata + 1))
        asked = np.concatenate([est_done[:, column], est_run[:, column]])
        asked = asked[np.isfinite(asked) & (asked <= edges[-1])]
        counts = np.bincount(np.searchsorted(edges[1:-1], asked, side="right"), minlength=self.n_strata)
        stratum = np.searchsorted(edges[1:-1], cost, side="right")
        candidates = corner & adds
        short = np.flatnonzero((np.bincount(stratum[candidates], minlength=self.n_strata) > 0)
                               & (counts < self.stratum_min))
        if not len(short):
            return None
        fewest = short[counts[short] == counts[short].min()]
        return candidates & (stratum == fewest[rng.integers(len(fewest))])

    def _startup_index(self, est, estimated, metric_names, asked: int, rng) -> int:
        """One candidate from stratum ``asked % n_startup`` of an estimated objective (random without one)."""
        import numpy as np

        if est.shape[1] == 0:
            return int(rng.integers(len(est)))
        column = self._estimate_names.index(metric_names[estimated.index(True)]) if any(estimated) else 0
        order = np.argsort(np.nan_to_num(est[:, column], nan=np.inf), kind="stable")
        k = asked % self.n_startup
        lo = len(order) * k // self.n_startup
        hi = max(len(order) * (k + 1) // self.n_startup, lo + 1)
        return int(order[int(rng.integers(lo, hi))])

    def _fit_predict(self, x, y, x_new, rng, clip):
        """Mean and spread over the trees of one forest per objective (column of ``y``); the
        targets of the objectives ``clip`` marks have their worst quarter clipped."""
        import numpy as np
        from sklearn.ensemble import RandomForestRegressor

        mus, sds = [], []
        for i in range(y.shape[1]):
            target = np.minimum(y[:, i], np.quantile(y[:, i], 0.75)) if clip[i] else y[:, i]
            forest = RandomForestRegressor(n_estimators=self.n_trees, max_features=1 / 3, n_jobs=1,
                                           random_state=int(rng.integers(2**31 - 1))).fit(x, target)
            per_tree = np.stack([tree.predict(x_new) for tree in forest.estimators_])
            mus.append(per_tree.mean(axis=0))
            sds.append(per_tree.std(axis=0))
        return np.stack(mus, axis=1), np.stack(sds, axis=1)

    def _estimated_feasible(self, est):
        import numpy as np

        if self._calibration is not None and len(est):
            est = self._calibration.correct_columns(self._estimate_names, est)
        ok = np.ones(len(est), dtype=bool)
        for c in self._constraints:
            if self._estimate_names and c.metric in self._estimate_names:
                col = est[:, self._estimate_names.index(c.metric)]
                ok &= np.array([c.violation({c.metric: v}) in (0.0, None) for v in col], dtype=bool)
        return ok

    def _hopeless(self, optimistic, metric_names):
        """Candidates whose optimistic prediction (original units) still breaks a constraint on an objective."""
        import numpy as np

        bad = np.zeros(len(optimistic), dtype=bool)
        for c in self._constraints:
            if c.metric in metric_names:
                i = metric_names.index(c.metric)
                bad |= np.array([bool(c.violation({c.metric: v})) for v in optimistic[:, i]], dtype=bool)
        return bad


def _within(codes, centres, distance: int):
    """Rows of ``codes`` that differ from some row of ``centres`` in at most ``distance`` places."""
    import numpy as np

    near = np.zeros(len(codes), dtype=bool)
    for centre in centres:
        near |= (codes != centre[None, :]).sum(axis=1) <= distance
    return near
