"""
What the training loop watches besides the loss: the loss-spike rules (ours and OLMo's), the step timer behind
the progress line's ms/iter and ETA, and the per-layer diagnostics recorder (diag.jsonl). Imports torch-free
helpers and stable_gpt's diagnostics only.
"""

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
    """Loss spikes as OLMo counts them (the "spike score" of OLMo 2, arXiv 2501.00656; the numbers of
    OLMo-core's stability monitor): a step whose loss is more than `sigmas` standard deviations above the mean
    of the previous `window` steps. `score` is the percentage of scored steps (those with a full window
    before them) that spiked, comparable across runs of different lengths; the state survives a resume."""

    def __init__(self, sigmas=6.0, window=128, recent=(), spike_iters=(), scored=0):
        self.sigmas, self.recent = sigmas, deque(recent, maxlen=window)
        self.spike_iters, self.scored = list(spike_iters), scored

    def update(self, iter_num, loss):
        """Feed step iter_num's loss; returns whether it is a spike."""
        spike = False
        if len(self.recent) == self.recent.maxlen:
            self.scored += 1
            spike = loss > statistics.fmean(self.recent) + self.sigmas * statistics.pstdev(self.recent)
            if spike:
                self.spike_iters.append(iter_num)
        self.recent.append(loss)
        return spike

    @property
    def score(self):
        return 100.0 * len(self.spike_iters) / self.scored if self.scored else None

    def state(self):
        return dict(sigmas=self.sigmas, window=self.recent.maxlen, recent=list(self.recent),
                    spike_iters=list(self.spike_iters), scored=self.scored)


class SpikeWatch:
    """Both spike rules over a run's step losses: ours (SpikeDetector, with the iterations it flagged) and OLMo's
    (OLMoSpikeScore). state() goes into every checkpoint, so that a resumed run continues both."""
    STATE_KEYS = ("spikes", "recent_losses", "olmo_spikes")  # state()'s keys, as a checkpoint stores them

    def __init__(self, factor, window, state=None):
        state = state or {}
        self.median_rule = SpikeDetector(factor, window, state.get("recent_losses", ()))
        self.iters = list(state.get("spikes", ()))
        self.olmo = OLMoSpikeScore(**state.get("olmo_spikes", {}))

    def update(self, iter_num, loss):
        """Feed step iter_num's loss; returns the median it was compared with if ours calls it a spike, else None."""
        self.olmo.update(iter_num, loss)
        median = self.median_rule.update(loss)
        if median is not None:
            self.iters.append(iter_num)
        return median

    def state(self):
        return dict(spikes=list(self.iters), recent_losses=list(self.median_rule.recent), olmo_spikes=self.olmo.state())

    def summary(self):
        return dict(spikes=len(self.iters), spike_iters=self.iters[:100], olmo_spikes=len(self.olmo.spike_iters),
                    olmo_spike_score=self.olmo.score, olmo_spike_iters=self.olmo.spike_iters[:100])


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
