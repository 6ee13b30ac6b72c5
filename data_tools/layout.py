"""What a manifest's `segment_tokens` and `window_segments` say about its samples, checked by `arc-data verify`.

A build cuts each document into segments at a word boundary within `segment_tokens` encoder tokens, searched back
to half that (data_tools/segment.py), and groups them into windows (data_tools/samples.py `windows`): every window
of a document but its last holds exactly `window_segments` segments, the last one 1 to `window_segments` + 1. A
manifest whose settings were edited, or shards built with other ones, break these rules.
"""

import numpy as np

MIN_COUNTED = 20  # segments needed before their lengths say anything about segment_tokens
MIN_IN_RANGE = 0.5  # share of cut segments within [segment_tokens / 2, segment_tokens] (overlong words fall outside)


class Layout:
    def __init__(self, segment_tokens: int, window_segments: int):
        self.segment_tokens, self.window_segments = segment_tokens, window_segments
        self.docs: dict[str, tuple[int, dict[int, int]]] = {}  # doc -> (last window, {window: n_segments} if not N)
        self.counted = self.in_range = 0

    def add(self, key: str, n_segments: int, enc_offsets: np.ndarray) -> None:
        """One sample: its key `<doc>-<window>`, segment count and encoder offsets (n_segments + 1,)."""
        doc, _, window = key.partition("-")
        if not window.isdigit():
            return
        last, odd = self.docs.get(doc, (-1, {}))
        if n_segments != self.window_segments:
            odd[int(window)] = n_segments
        self.docs[doc] = (max(last, int(window)), odd)
        lengths = np.diff(enc_offsets.astype(np.int64))[:-1]  # a sample's last segment may end its document
        self.counted += len(lengths)
        self.in_range += int(((lengths >= self.segment_tokens // 2) & (lengths <= self.segment_tokens)).sum())

    def problems(self) -> list[str]:
        n, out = self.window_segments, []
        bad = [
            (doc, w, k)
            for doc, (last, odd) in self.docs.items()
            for w, k in odd.items()
            if w < last or not 1 <= k <= n + 1
        ]
        if bad:
            doc, w, k = bad[0]
            out.append(
                f"window_segments {n}: sample {doc}-{w:05d} has {k} segments, and {len(bad) - 1} more windows break "
                f"the rule (every window of a document but its last has {n}); built with another --window-segments?"
            )
        if self.counted >= MIN_COUNTED and self.in_range < MIN_IN_RANGE * self.counted:
            out.append(
                f"segment_tokens {self.segment_tokens}: only {self.in_range} of {self.counted} cut segments have "
                f"{self.segment_tokens // 2} to {self.segment_tokens} encoder tokens; built with another "
                f"--segment-tokens?"
            )
        return out
