"""The Redis store's local buffer: deltas recorded but not yet persisted, coalesced.

Nothing here grows with traffic, only with the number of distinct keys deltas fold into:
    windows   route -> bucket -> Bucket: counts and histogram bins add up per (route, bucket)
    usage     (day, route, model, client) -> [requests, prompt, completion, pico-USD]
    circuits  route -> CircuitDelta (net effect of this process's outcomes, composable)

What is kept when the bound (`StatsOptions.max_pending` entries) is hit, in order:
    1. buckets past every window's retention are dropped: Redis would expire them on arrival;
    2. from then on, new attempts still add to their buckets' attempt and failure counters
       (uptime stays exact) but their latency / TTFT / throughput samples are shed (counted in
       `dropped_samples` and moegw_stats_dropped_samples_total): percentiles for that stretch
       come from the samples recorded before the bound was hit;
    3. usage and circuit deltas are never dropped: usage is exact however long Redis is away.
So the buffer's size is at most max_pending entries plus two counters per live bucket (at most
324 per route) plus one usage vector per distinct (day, route, model, client).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.stats.base import Attempt, Usage
from gateway.stats.circuit import CircuitDelta
from gateway.stats.usage import UsageKey, UsageVector, add_into, usage_key, usage_vector
from gateway.stats.windows import Bucket, BucketKey, bucket_keys_for, sample_of, ttl_s


@dataclass(slots=True)
class PendingDeltas:
    windows: dict[str, dict[BucketKey, Bucket]] = field(default_factory=dict)
    usage: dict[UsageKey, UsageVector] = field(default_factory=dict)
    circuits: dict[str, CircuitDelta] = field(default_factory=dict)
    records: int = 0  # record_* calls folded in
    entries: int = 0  # what the bound counts: bucket fields + 4 per usage key + circuits

    @property
    def empty(self) -> bool:
        return self.records == 0

    def add_attempt(self, attempt: Attempt, at: float, *, with_samples: bool) -> None:
        buckets = self.windows.setdefault(attempt.route_id, {})
        sample = sample_of(attempt, with_samples=with_samples)
        for key in bucket_keys_for(at):
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = Bucket()
                self.entries += 2
            self.entries += bucket.add_sample(sample)
        previous = self.circuits.get(attempt.route_id)
        if previous is None:
            self.entries += 1
            previous = CircuitDelta()
        self.circuits[attempt.route_id] = previous.then(CircuitDelta.of(attempt.ok, at))
        self.records += 1

    def add_usage(self, usage: Usage, at: float) -> None:
        if add_into(self.usage, usage_key(usage, at), usage_vector(usage)):
            self.entries += 4
        self.records += 1

    def prune(self, now: float) -> None:
        """Drops buckets no window will ever read again (step 1 of the policy above)."""
        for buckets in self.windows.values():
            for key in [k for k in buckets if ttl_s(k, now) <= 0]:
                self.entries -= buckets.pop(key).entries

    def touched(self) -> dict[str, set[BucketKey]]:
        return {route: set(buckets) for route, buckets in self.windows.items()}
