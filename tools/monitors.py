"""
What the training loop watches besides the loss: the loss-spike rules (ours and OLMo's), the step timer behind
the progress line's ms/iter and ETA, and the per-layer diagnostics recorder (diag.jsonl). Imports torch-free
helpers and stable_gpt's diagnostics only.
"""

import math
import statistics
import time
from collections import deque

import stable_gpt


class SpikeDetector:
    """A loss spike is a step whose loss exceeds `factor` x the median loss of the previous `window` steps
    (no verdict before `window` steps have been seen). A median, unlike a mean, is not dragged up by the
    spike itself or by the falling loss of early training."""

    def __init__(self, factor, window, recent=()):
        self.factor = factor
        self.recent = deque(recent, maxlen=window)

    def update(self, loss):
        """Feed one step's loss; returns the median it was compared with if it is a spike, else None."""
        median = statistics.median(self.recent) if len(self.recent) == self.recent.maxlen else None
        self.recent.append(loss)
        return median if median is not None and loss > self.factor * median else None


class StepTimer:
    """Seconds per optimizer step between two progress lines, evaluations left out, and an exponentially
    smoothed value of it for a steady ETA (the raw value swings with evaluations and other tenants)."""

    def __init__(self, iter_num):
        self.start, self.start_iter, self.smooth = time.time(), iter_num, None
        self.first_iter, self.first_done = iter_num + 1, None  # the first step holds one-time costs (compile)

    def restart(self):
        """After an evaluation: its time is not step time."""
        self.start, self.first_done = time.time(), None

    def step_done(self, iter_num):
        if iter_num == self.first_iter:
            self.first_done = time.time()

    def lap(self, iter_num):
        """(seconds per step since the last lap, the smoothed value), iter_num the steps done; starts the next lap.
        A lap that holds the run's first step and others leaves the first out: it includes torch.compile."""
        steps, now = iter_num - self.start_iter, time.time()
        first_done, self.first_done = self.first_done, None
        dt = (now - first_done) / (steps - 1) if first_done and steps > 1 else (now - self.start) / steps
        self.start, self.start_iter = now, iter_num
        self.smooth = dt if self.smooth is None else 0.8 * self.smooth + 0.2 * dt
        return dt, self.smooth


class OLMoSpikeScore:
    """Spikes as OLMo-core's StabilityMonitorCallback counts them (olmo_core/train/callbacks/
    stability_monitor.py; the "spike score" of OLMo 2, arXiv 2501.00656 Sec. 3.2). A step spikes when its loss
    *or* its gradient norm exceeds mean + `threshold_std` x std (population std) of that series' previous
    `window_size` values; nothing is flagged before a full window, nor when the window's std is below 1e-10
    (a flat history). Two scores, both fractions (not percentages): `score`, spiking steps / all steps seen,
    reported once `window_size` steps are seen, and `rolling_score`, the rate over the last `rolling_window`
    steps, reported once that many are seen. OLMo-core's defaults are 6 std over 128 values; the OLMo 2 paper
    (Sec. 3.2) uses 7 std over 1,000: OLMoSpikeScore(threshold_std=7, window_size=1000). The state survives a
    resume."""
    STATE_KEYS = ("threshold_std", "window_size", "rolling_window", "losses", "grad_norms", "flags", "spike_iters",
                  "steps")

    def __init__(self, threshold_std=6.0, window_size=128, rolling_window=10_000):
        self.threshold_std, self.window_size, self.rolling_window = threshold_std, window_size, rolling_window
        self.losses, self.grad_norms = deque(maxlen=window_size), deque(maxlen=window_size)
        self.flags = deque(maxlen=rolling_window)  # one bool per step: did it spike
        self.spike_iters, self.steps = [], 0

    def is_spike(self, value, history):
        if len(history) < self.window_size:
            return False
        mean = statistics.fmean(history)
        std = statistics.pstdev(history, mean)
        return std >= 1e-10 and value > mean + self.threshold_std * std

    def update(self, iter_num, loss, grad_norm=None):
        """Feed step iter_num's loss and gradient norm (None: not measured); returns whether it spiked."""
        spike = self.is_spike(loss, self.losses)
        self.losses.append(loss)
        if grad_norm is not None:
            spike = self.is_spike(grad_norm, self.grad_norms) or spike
            self.grad_norms.append(grad_norm)
        self.flags.append(spike)
        self.steps += 1
        if spike:
            self.spike_iters.append(iter_num)
        return spike

    @property
    def score(self):
        return len(self.spike_iters) / self.steps if self.steps >= self.window_size else None

    @property
    def rolling_score(self):
        return sum(self.flags) / self.rolling_window if len(self.flags) >= self.rolling_window else None

    def state(self):
        return dict(threshold_std=self.threshold_std, window_size=self.window_size,
                    rolling_window=self.rolling_window, losses=list(self.losses), grad_norms=list(self.grad_norms),
                    flags=list(self.flags), spike_iters=list(self.spike_iters), steps=self.steps)

    @classmethod
    def from_state(cls, state):
        """A checkpoint's state; one written before the rule followed OLMo-core (other keys) starts afresh."""
        if not state or set(state) != set(cls.STATE_KEYS):
            return cls()
        score = cls(state["threshold_std"], state["window_size"], state["rolling_window"])
        score.losses.extend(state["losses"])
        score.grad_norms.extend(state["grad_norms"])
        score.flags.extend(state["flags"])
        score.spike_iters, score.steps = list(state["spike_iters"]), state["steps"]
        return score


class SkipStep:
    """OLMo-core's skip-step rule (allenai/OLMo-core, olmo_core/optim/skip_step_optimizer.py, SkipStepOptimizer;
    OLMo 2 trains with it, arXiv 2501.00656): the update of a step is skipped when its loss or its gradient norm is
    more than `sigma` standard deviations from the mean of the previous values in a rolling window of `window`
    steps. The window holds the last window + 1 values, skipped steps' included; no step is skipped before it holds
    max(20, window // 2); the std is the unbiased one (torch.std_mean's). As in OLMo-core's code, a z-score that is
    not a number (a window whose values are all equal: 0 / 0) skips too. state() goes into every checkpoint."""

    def __init__(self, window=128, sigma=6.0, state=None):
        self.window, self.sigma = window, sigma
        state = state or {}
        self.losses, self.grad_norms = list(state.get("losses", ())), list(state.get("grad_norms", ()))

    def skip(self, loss, grad_norm):
        """Add this step's loss and gradient norm; True: skip its update."""
        for values, value in ((self.losses, loss), (self.grad_norms, grad_norm)):
            values.append(float(value))
            del values[:-(self.window + 1)]
        if len(self.losses) < max(20, self.window // 2):
            return False
        return not all(self.z_score(values) <= self.sigma for values in (self.losses, self.grad_norms))

    @staticmethod
    def z_score(values):
        """|latest - mean(the others)| / std(the others), NaN for 0 / 0 (which compares False with anything)."""
        previous = values[:-1]
        mean, std = statistics.fmean(previous), statistics.stdev(previous)
        deviation = abs(values[-1] - mean)
        return deviation / std if std > 0 else math.inf if deviation > 0 else math.nan

    def state(self):
        return dict(losses=list(self.losses), grad_norms=list(self.grad_norms))


class ZClip:
    """ZClip (Kumar et al., arXiv 2504.02507; official code bluorion-com/ZClip, zclip/zclip.py, its defaults: z-score
    mode, adaptive scaling): the gradient norm is clipped at a threshold set by an EMA of its own mean and variance.
    The first `warmup` norms only initialize them (mean, and the population variance); after that a norm whose
    z-score z = (norm - mean) / (std + eps) exceeds `z_thresh` is clipped to mean + z_thresh * std / (z / z_thresh)
    (the larger the outlier, the harder the clip), and the EMA (alpha) takes the clipped norm: mean first, then the
    variance around the new mean, as the official code. The fixed clip (--grad-clip) still applies on top, as the
    official max_grad_norm does. state() goes into every checkpoint."""

    def __init__(self, alpha=0.97, z_thresh=2.5, warmup=25, eps=1e-6, state=None):
        self.alpha, self.z_thresh, self.warmup, self.eps = alpha, z_thresh, warmup, eps
        state = state or {}
        self.buffer, self.mean, self.var = list(state.get("buffer", ())), state.get("mean"), state.get("var")

    def clip_value(self, norm):
        """This step's clip for a gradient norm (None: no adaptive clip), and the EMA updated with what passes."""
        if self.mean is None:  # warming up: collect, then initialize
            self.buffer.append(norm)
            if len(self.buffer) >= self.warmup:
                self.mean = statistics.fmean(self.buffer)
                self.var = statistics.fmean((x - self.mean) ** 2 for x in self.buffer)
                self.buffer = []
            return None
        std = self.var ** 0.5
        z = (norm - self.mean) / (std + self.eps)
        clip = self.mean + self.z_thresh * std / (z / self.z_thresh) if z > self.z_thresh else None
        passed = norm if clip is None else clip
        self.mean = self.alpha * self.mean + (1 - self.alpha) * passed
        self.var = self.alpha * self.var + (1 - self.alpha) * (passed - self.mean) ** 2
        return clip

    def state(self):
        return dict(buffer=list(self.buffer), mean=self.mean, var=self.var)


class SpikeWatch:
    """Both spike rules over a run's step losses: ours (SpikeDetector, with the iterations it flagged) and OLMo's
    (OLMoSpikeScore). state() goes into every checkpoint, so that a resumed run continues both."""
    STATE_KEYS = ("spikes", "recent_losses", "olmo_spikes")  # state()'s keys, as a checkpoint stores them

    def __init__(self, factor, window, state=None):
        state = state or {}
        self.median_rule = SpikeDetector(factor, window, state.get("recent_losses", ()))
        self.iters = list(state.get("spikes", ()))
        self.olmo = OLMoSpikeScore.from_state(state.get("olmo_spikes"))

    def update(self, iter_num, loss, grad_norm=None):
        """Feed step iter_num's loss (and gradient norm, for OLMo's rule); returns the median it was compared with
        if ours calls it a spike, else None."""
        self.olmo.update(iter_num, loss, grad_norm)
        median = self.median_rule.update(loss)
        if median is not None:
            self.iters.append(iter_num)
        return median

    def state(self):
        return dict(spikes=list(self.iters), recent_losses=list(self.median_rule.recent), olmo_spikes=self.olmo.state())

    def summary(self):
        return dict(spikes=len(self.iters), spike_iters=self.iters[:100], olmo_spikes=len(self.olmo.spike_iters),
                    olmo_spike_score=self.olmo.score, olmo_spike_score_rolling=self.olmo.rolling_score,
                    olmo_spike_iters=self.olmo.spike_iters[:100])


class DiagnosticsRecorder:
    """Per-layer diagnostics every `interval` optimizer steps (stable_gpt's functions), one diag.jsonl line
    per record, on one fixed batch. The training loop calls these at fixed points of every step; each does
    nothing on a step without a record:
        before_step(iter_num)   a copy of the block matrices, for the update ratios
        after_backward()        gradient norms, before clipping (as OLMo's logs and SDD's Fig. 7)
        after_update()          update ratios |dW|/|W| of the optimizer step (before TVR edits the weights)
        end_step()              activation statistics, layer importance, weight stds; writes the line
    `seconds` is the time spent here (summary.json's diag_s)."""

    def __init__(self, model, batch, log, interval):
        self.model, (self.x, self.y), self.log, self.interval = model, batch, log, interval
        self.record, self.seconds = None, 0.0

    def _timed(self, fn):
        if self.record is not None:
            started = time.time()
            fn(self.record)
            self.seconds += time.time() - started

    def before_step(self, iter_num):
        self.record = None
        if self.interval > 0 and (iter_num + 1) % self.interval == 0:
            self.record = {"iter": iter_num + 1}
            self._timed(lambda r: r.update(before=stable_gpt.matrix_snapshot(self.model)))

    def after_backward(self):
        self._timed(lambda r: r.update(grad_norm=stable_gpt.grad_norms(self.model)))

    def after_update(self):
        self._timed(lambda r: r.update(update_ratio=stable_gpt.update_ratios(r.pop("before"), self.model)))

    def end_step(self):
        self._timed(lambda r: r.update(stable_gpt.activation_stats(self.model, self.x, self.y),
                                       layer_importance=stable_gpt.layer_importance(self.model, self.x, self.y),
                                       weight_std=stable_gpt.weight_stds(self.model)))
        if self.record is not None:
            self.log.write(**self.record)
            self.record = None
