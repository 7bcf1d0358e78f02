"""Rolling windows shared by both stores: time buckets of counters and log-binned histograms.

Buckets. FINE buckets are 60 s long and kept an hour; they serve the "5m" and "30m" windows
and the dashboard's 1h series. COARSE buckets are 900 s long and kept one day; they serve "1d"
and the 24h series. HOUR buckets are 3600 s long and kept 7 days, for the dashboard's 7d series
only (the router never reads them). A window covers its N most recent buckets *including the
current, partial one*, so "5m" holds between 4 and 5 minutes of history, "30m" between 29 and
30 and "1d" between 23h45 and 24h. Memory per route is bounded: at most 60 + 96 + 168 buckets,
each with at most 2 + 3 x HISTOGRAM_BINS entries (in practice a couple of dozen bins per
metric, since latencies cluster within a decade or two).

Histograms (DDSketch-style). A positive value x falls in bin i = ceil(log_gamma(x)), i.e.
gamma^(i-1) < x <= gamma^i with gamma = (1 + ALPHA) / (1 - ALPHA), and the bin is reported as
2 gamma^i / (gamma + 1). Percentile accuracy: the reported p-quantile is within ALPHA = 5 %
relative error of x_k, the sample of rank k = ceil(p * n) (numpy's method="inverted_cdf"), for
samples in [MIN_VALUE, MAX_VALUE] = [1e-4, 1e6] (seconds for latency and TTFT, tokens/s for
throughput). Smaller values are reported as MIN_VALUE, larger as MAX_VALUE. The error does not
grow with the number of samples or buckets merged: merging is exact bin-count addition.

A bucket is a flat mapping in Redis (one hash per bucket, fields below) and a `Bucket` object in
memory; `to_fields` / `from_fields` convert.
    "n" attempts, "f" failures, "l<i>" latency bin i, "t<i>" TTFT bin i, "s<i>" throughput bin i
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import accumulate

from gateway.stats.base import Attempt, SeriesPoint, WindowStats

ALPHA = 0.05
GAMMA = (1 + ALPHA) / (1 - ALPHA)
_LOG_GAMMA = math.log(GAMMA)
MIN_VALUE = 1e-4
MAX_VALUE = 1e6
MIN_BIN = math.ceil(math.log(MIN_VALUE) / _LOG_GAMMA)
MAX_BIN = math.ceil(math.log(MAX_VALUE) / _LOG_GAMMA)
HISTOGRAM_BINS = MAX_BIN - MIN_BIN + 1

FINE_S = 60
COARSE_S = 900
HOUR_S = 3600
# window name -> (bucket length, number of buckets)
WINDOWS: dict[str, tuple[int, int]] = {"5m": (FINE_S, 5), "30m": (FINE_S, 30), "1d": (COARSE_S, 96)}
# the dashboard's time series: span -> (bucket length, number of buckets)
SERIES: dict[str, tuple[int, int]] = {
    "1h": (FINE_S, 60),
    "24h": (COARSE_S, 96),
    "7d": (HOUR_S, 168),
}
# bucket length -> how long a bucket stays useful after it starts (its own length + history)
RETENTION_S = {FINE_S: FINE_S * 60, COARSE_S: COARSE_S * 96, HOUR_S: HOUR_S * 168}

BucketKey = tuple[int, int]  # (bucket length s, bucket start unix s)


def bin_of(value: float) -> int:
    if not value > MIN_VALUE:  # also catches NaN
        return MIN_BIN
    if value >= MAX_VALUE:
        return MAX_BIN
    return math.ceil(math.log(value) / _LOG_GAMMA)


def bin_value(index: int) -> float:
    return 2 * GAMMA**index / (GAMMA + 1)


def percentile(histogram: Mapping[int, int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of a bin -> count histogram, within ALPHA relative."""
    return percentiles(histogram, (q,))[0]


def percentiles(histogram: Mapping[int, int], qs: tuple[float, ...]) -> list[float | None]:
    """Several quantiles of one histogram, sorting its bins once."""
    if not histogram:
        return [None] * len(qs)
    bins = sorted(histogram)
    cumulative = list(accumulate(histogram[index] for index in bins))
    total = cumulative[-1]
    if total <= 0:
        return [None] * len(qs)
    out: list[float | None] = []
    for q in qs:
        rank = max(1, math.ceil(q * total - 1e-9))  # the 1e-9 keeps 0.99 * 100 at rank 99
        out.append(bin_value(bins[min(bisect_left(cumulative, rank), len(bins) - 1)]))
    return out


def throughput(attempt: Attempt) -> float | None:
    """Completion tokens per second of generation, for successful attempts that produced any.

    With a TTFT that leaves time for decoding, it is (tokens - 1) / (latency - ttft): the pace
    after the first token. Otherwise (non-streams, where the first token comes with the body)
    it is tokens / latency."""
    tokens, latency = attempt.completion_tokens, attempt.latency_s
    if not attempt.ok or tokens <= 0 or not latency > 0 or not math.isfinite(latency):
        return None
    ttft = attempt.ttft_s
    if ttft is not None and math.isfinite(ttft) and tokens > 1 and latency - ttft > 1e-3:
        return (tokens - 1) / (latency - ttft)
    return tokens / latency


def _finite_nonnegative(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value >= 0


# One attempt, binned once: (failed, latency bin, TTFT bin, throughput bin); None = no sample
Sample = tuple[bool, int | None, int | None, int | None]


def sample_of(attempt: Attempt, *, with_samples: bool = True) -> Sample:
    failed = not attempt.ok
    if not with_samples:
        return (failed, None, None, None)
    latency = bin_of(attempt.latency_s) if _finite_nonnegative(attempt.latency_s) else None
    ttft = attempt.ttft_s
    ttft_bin = bin_of(ttft) if ttft is not None and _finite_nonnegative(ttft) else None
    tps = throughput(attempt)
    return (failed, latency, ttft_bin, None if tps is None else bin_of(tps))


@dataclass(slots=True)
class Bucket:
    """Counters and histograms of the attempts that started within one bucket (or a window)."""

    attempts: int = 0
    failures: int = 0
    latency: dict[int, int] = field(default_factory=dict)
    ttft: dict[int, int] = field(default_factory=dict)
    throughput: dict[int, int] = field(default_factory=dict)

    @property
    def entries(self) -> int:
        return 2 + len(self.latency) + len(self.ttft) + len(self.throughput)

    def add_attempt(self, attempt: Attempt, *, with_samples: bool = True) -> int:
        """Fold one attempt in; returns how many histogram entries it created."""
        return self.add_sample(sample_of(attempt, with_samples=with_samples))

    def add_sample(self, sample: Sample, sign: int = 1) -> int:
        """Adds (sign=1) or removes one binned attempt; returns the entries it created."""
        failed, latency, ttft, tps = sample
        self.attempts += sign
        if failed:
            self.failures += sign
        created = 0
        if latency is not None:
            created += _bump(self.latency, latency, sign)
        if ttft is not None:
            created += _bump(self.ttft, ttft, sign)
        if tps is not None:
            created += _bump(self.throughput, tps, sign)
        return created

    def merge(self, other: Bucket, sign: int = 1) -> None:
        self.attempts += sign * other.attempts
        self.failures += sign * other.failures
        for mine, theirs in (
            (self.latency, other.latency),
            (self.ttft, other.ttft),
            (self.throughput, other.throughput),
        ):
            for index, count in theirs.items():
                _bump(mine, index, sign * count)

    def stats(self) -> WindowStats:
        if self.attempts <= 0:
            return WindowStats()
        latency = percentiles(self.latency, (0.50, 0.99))
        ttft = percentiles(self.ttft, (0.50, 0.99))
        return WindowStats(
            requests=self.attempts,
            failures=self.failures,
            uptime=(self.attempts - self.failures) / self.attempts,
            latency_p50_s=latency[0],
            latency_p99_s=latency[1],
            ttft_p50_s=ttft[0],
            ttft_p99_s=ttft[1],
            tokens_per_s=percentile(self.throughput, 0.50),
        )

    def to_fields(self) -> dict[str, int]:
        fields = {"n": self.attempts, "f": self.failures}
        for prefix, histogram in (("l", self.latency), ("t", self.ttft), ("s", self.throughput)):
            for index, count in histogram.items():
                fields[f"{prefix}{index}"] = count
        return {name: count for name, count in fields.items() if count}

    @classmethod
    def from_fields(cls, fields: Mapping[str, str | int]) -> Bucket:
        bucket = cls()
        histograms = {"l": bucket.latency, "t": bucket.ttft, "s": bucket.throughput}
        for name, raw in fields.items():
            count = int(raw)
            if name == "n":
                bucket.attempts = count
            elif name == "f":
                bucket.failures = count
            elif name[:1] in histograms and count:
                histograms[name[:1]][int(name[1:])] = count
        return bucket


def _bump(histogram: dict[int, int], index: int, count: int) -> int:
    """Adds count to a bin, dropping bins that reach zero; returns the change in bins."""
    before = histogram.get(index)
    total = (before or 0) + count
    if total:
        histogram[index] = total
        return 0 if before else 1
    histogram.pop(index, None)
    return -1 if before else 0


def bucket_start(at: float, length: int) -> int:
    return int(at // length) * length


def bucket_keys_for(at: float) -> tuple[BucketKey, BucketKey, BucketKey]:
    """The fine, the coarse and the hour bucket an event at `at` lands in."""
    return (
        (FINE_S, bucket_start(at, FINE_S)),
        (COARSE_S, bucket_start(at, COARSE_S)),
        (HOUR_S, bucket_start(at, HOUR_S)),
    )


def series_keys(span: str, now: float) -> list[BucketKey]:
    """The buckets of a dashboard series, oldest first (ValueError for an unknown span)."""
    if span not in SERIES:
        raise ValueError(f"span must be one of {', '.join(SERIES)}")
    length, count = SERIES[span]
    current = bucket_start(now, length)
    return [(length, current - i * length) for i in range(count - 1, -1, -1)]


def in_window(key: BucketKey, window: str, now: float) -> bool:
    length, count = WINDOWS[window]
    if key[0] != length:
        return False
    current = bucket_start(now, length)
    return current - (count - 1) * length <= key[1] <= current


def ttl_s(key: BucketKey, now: float) -> int:
    """Seconds a bucket still matters (<= 0: out of every window: drop it)."""
    length, start = key
    return math.ceil(start + length + RETENTION_S[length] - now)


def recent_keys(now: float) -> list[BucketKey]:
    """The current and the previous bucket of each length: where late writes usually land."""
    keys = []
    for length in (FINE_S, COARSE_S):
        current = bucket_start(now, length)
        keys += [(length, current), (length, current - length)]
    return keys


def all_keys(now: float) -> list[BucketKey]:
    keys = []
    for length, count in {WINDOWS["30m"], WINDOWS["1d"]}:
        current = bucket_start(now, length)
        keys += [(length, current - i * length) for i in range(count)]
    return keys


class RouteWindows:
    """One route's buckets, with each window's sum kept up to date incrementally so that a
    health read costs a few dict merges, not a pass over 126 buckets."""

    __slots__ = ("_anchor", "_sums", "buckets")

    def __init__(self) -> None:
        self.buckets: dict[BucketKey, Bucket] = {}
        self._sums: dict[str, Bucket] = {}
        self._anchor: dict[str, int] = {}  # window -> current bucket start its sum is for

    def add_attempt(self, attempt: Attempt, at: float) -> None:
        delta = Bucket()
        delta.add_attempt(attempt)
        self.add_bucket(at, delta)

    def add_bucket(self, at: float, delta: Bucket) -> None:
        """Fold in what a batch of attempts within one fine bucket (the one `at` is in) added."""
        for key in bucket_keys_for(at):
            bucket = self.buckets.get(key)
            if bucket is None:
                bucket = self.buckets[key] = Bucket()
            bucket.merge(delta)
            for name, anchor in self._anchor.items():
                if in_window(key, name, anchor):
                    self._sums[name].merge(delta)

    def replace(self, key: BucketKey, bucket: Bucket) -> None:
        old = self.buckets.pop(key, None)
        if old is not None:
            self._shift_sums(key, old, -1)
        if bucket.attempts or bucket.entries > 2:
            self.buckets[key] = bucket
            self._shift_sums(key, bucket, 1)

    def prune(self, now: float) -> None:
        for key in [k for k in self.buckets if ttl_s(k, now) <= 0]:
            del self.buckets[key]

    def window(self, name: str, now: float) -> Bucket:
        """The sum of the buckets in a window (shared: copy before mutating)."""
        length, _ = WINDOWS[name]
        current = bucket_start(now, length)
        if self._anchor.get(name) != current:
            total = Bucket()
            for key, bucket in self.buckets.items():
                if in_window(key, name, now):
                    total.merge(bucket)
            self._sums[name] = total
            self._anchor[name] = current
        return self._sums[name]

    def _shift_sums(self, key: BucketKey, delta: Bucket, sign: int) -> None:
        for name, anchor in self._anchor.items():
            if in_window(key, name, anchor):
                self._sums[name].merge(delta, sign)


class LazyWindows(Mapping[str, WindowStats]):
    """RouteHealth.windows: each window's stats computed on first access and kept. The router
    reads them only to sort by latency or throughput, while it reads the circuit every time."""

    __slots__ = ("_compute", "_done")

    def __init__(self, compute: Callable[[str], WindowStats]) -> None:
        self._compute = compute
        self._done: dict[str, WindowStats] = {}

    def __getitem__(self, name: str) -> WindowStats:
        if name not in WINDOWS:
            raise KeyError(name)
        stats = self._done.get(name)
        if stats is None:
            stats = self._done[name] = self._compute(name)
        return stats

    def __iter__(self) -> Iterator[str]:
        return iter(WINDOWS)

    def __len__(self) -> int:
        return len(WINDOWS)

    def __repr__(self) -> str:
        return repr(dict(self))

    def __deepcopy__(self, memo: dict[int, object]) -> dict[str, WindowStats]:
        return dict(self)  # dataclasses.asdict() and copies get plain, computed values

    def __reduce__(
        self,
    ) -> tuple[type[dict[str, WindowStats]], tuple[list[tuple[str, WindowStats]]]]:
        return dict, (list(self.items()),)


def window_stats(parts: Iterable[Bucket]) -> WindowStats:
    total = Bucket()
    for part in parts:
        total.merge(part)
    return total.stats()


# The windows of a route with no history: one shared, read-only constant (pickles to a dict).
EMPTY_WINDOWS: Mapping[str, WindowStats] = LazyWindows(lambda _name: WindowStats())


def series_point(key: BucketKey, bucket: Bucket | None) -> SeriesPoint:
    return SeriesPoint(key[1], bucket.stats() if bucket is not None else WindowStats())
